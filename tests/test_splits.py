import pytest

from homegen.data.formats import PageLog, Shelf, UserSequence
from homegen.data.splits import leave_one_out, page_split, split_sequences_by_time


def test_leave_one_out():
    users = [UserSequence("a", list("123456")), UserSequence("b", list("12")), UserSequence("c", list("789"))]
    split = leave_one_out(users)
    assert [(u.user_id, u.items) for u in split["train"]] == [("a", list("1234")), ("b", list("12")), ("c", ["7"])]
    assert [(u.user_id, u.items) for u in split["validation"]] == [("a", list("12345")), ("c", ["7", "8"])]
    assert [(u.user_id, u.items) for u in split["test"]] == [("a", list("123456")), ("c", list("789"))]
    # The validation target is the second-to-last item, the test target the last; train never sees either.
    for val, test, train in zip(split["validation"], split["test"], [split["train"][0], split["train"][2]]):
        assert val.items[-1] == test.items[-2]
        assert val.items[-1] not in train.items and test.items[-1] not in train.items
        assert train.items == test.items[:-2]


def test_time_split():
    user = UserSequence("a", ["x", "y", "z", "w"], [1.0, 2.0, 5.0, 9.0])
    split = split_sequences_by_time([user, UserSequence("b", ["q"], [6.0])], valid_start=4.0, test_start=8.0)
    assert [u.items for u in split["train"]] == [["x", "y"]]
    assert [(u.user_id, u.items) for u in split["validation"]] == [("a", ["x", "y", "z"]), ("b", ["q"])]
    assert [u.items for u in split["test"]] == [["x", "y", "z", "w"]]
    with pytest.raises(ValueError, match="timestamps"):
        split_sequences_by_time([UserSequence("c", ["x"])], 1.0, 2.0)


def test_page_split():
    page = [Shelf("s", ["a"])]
    stamps = {None: "train", 1.0: "train", 5.0: "validation", 9.0: "test"}
    for stamp, expected in stamps.items():
        assert page_split(PageLog("u", page, timestamp=stamp), 4.0, 8.0) == expected
