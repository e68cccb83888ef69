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
