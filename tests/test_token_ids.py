"""TokenIds: an output's answer ids as a view of the growing answer list, read like a tuple."""

import pickle

import pytest

from optimus.core.outputs import TokenIds


def test_reads_like_the_tuple_of_its_first_n_ids():
    answer = [5, 6, 7, 8]
    ids = TokenIds(answer, 3)
    assert len(ids) == 3 and list(ids) == [5, 6, 7] and ids[0] == 5 and ids[-1] == 7
    assert ids[1:] == (6, 7) and isinstance(ids[1:], tuple) and ids[::-1] == (7, 6, 5) and ids[5:] == ()
    assert ids == (5, 6, 7) and (5, 6, 7) == ids and ids == [5, 6, 7] and ids != (5, 6, 7, 8) and ids != (5, 6, 8)
    assert ids + (9,) == (5, 6, 7, 9) and (4,) + ids == (4, 5, 6, 7) and [4] + ids == [4, 5, 6, 7]
    assert hash(ids) == hash((5, 6, 7)) and repr(ids) == "(5, 6, 7)" and bool(TokenIds([], 0)) is False
    with pytest.raises(IndexError):
        ids[3]  # the list has it, the view does not
    with pytest.raises(IndexError):
        ids[-4]


def test_growth_past_n_does_not_change_it_and_it_pickles_as_a_tuple():
    answer = [1, 2]
    ids = TokenIds(answer)
    answer.extend([3, 4])
    assert ids == (1, 2) and TokenIds(answer) == (1, 2, 3, 4)
    restored = pickle.loads(pickle.dumps(ids))
    assert restored == (1, 2) and type(restored) is tuple


def test_views_of_one_list_know_their_common_prefix_without_reading_it():
    answer = [1, 2, 3]
    short, longer = TokenIds(answer, 2), TokenIds(answer)
    assert short.shares_list(longer) and longer.shares_list(short)
    assert not short.shares_list(TokenIds([1, 2, 3])) and not short.shares_list((1, 2))


def _output(ids, text, finished=False):
    from optimus.core.outputs import RequestOutput, RequestStats
    return RequestOutput("r", (0,), ids, text, finished, "length" if finished else None, RequestStats())


def test_replica_deltas_rebuild_each_output_and_outputs_handed_out_never_change():
    from optimus.replicas.messages import Rebuild, delta_of

    answer = [7, 8]
    outputs = [_output(TokenIds(answer), "ab")]
    answer.extend([9, 10])
    outputs.append(_output(TokenIds(answer), "abcd"))
    outputs.append(_output(TokenIds(answer, 3), "abc", finished=True))  # a stop trims the answer back
    outputs.append(_output(TokenIds([7, 5, 6]), "aef"))  # another list: compared id by id
    rebuild, previous, rebuilt = Rebuild("r", (0,)), None, []
    for out in outputs:
        delta = delta_of(previous, out, events=False)
        rebuilt.append(rebuild.apply(delta))
        previous = out
    assert [d.token_ids for d in rebuilt] == [(7, 8), (7, 8, 9, 10), (7, 8, 9), (7, 5, 6)]
    assert [d.text for d in rebuilt] == ["ab", "abcd", "abc", "aef"]
    assert delta_of(outputs[0], outputs[1], events=False).base == 2  # only the new ids travel
    assert delta_of(outputs[2], outputs[3], events=False).base == 1


def test_extended_grows_in_place_and_replaces_a_list_it_must_cut():
    from optimus.core.outputs import extended

    ids = [1, 2]
    view = TokenIds(ids)
    assert extended(ids, 2, [3]) is ids and ids == [1, 2, 3]
    cut = extended(ids, 1, [9])
    assert cut == [1, 9] and cut is not ids and view == (1, 2) and ids == [1, 2, 3]
