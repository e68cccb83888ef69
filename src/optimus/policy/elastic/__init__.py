"""The saturation-aware policy: controller, tau estimators, latency curve, profiler and its setup."""
