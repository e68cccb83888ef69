"""``optimus serve --replicas N``: N engines behind one OpenAI-compatible ingress, on Ray Serve.

- ``messages``: the plain data crossing the Ray boundary (frozen dataclasses, no Ray types).
- ``replica``: one engine replica (an ``AsyncEngine`` in a Ray Serve replica actor).
- ``routing``: the ingress's view of each replica and the least-outstanding-work choice.
- ``client``: ``ReplicaSetClient``, the ``EngineClient`` the ingress's FastAPI app talks to.
- ``launch``: Ray start-up, the deployments, and the uvicorn ingress on the driver.

Only ``client`` and ``launch`` import Ray; nothing outside this package imports it."""
