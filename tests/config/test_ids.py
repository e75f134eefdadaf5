"""config.ids.as_id: what may be an id, and what is a 404 instead of a database error."""

from config.ids import MAX_ID, as_id


def test_as_id_takes_whole_positive_64_bit_numbers_only():
    assert as_id("42") == 42 and as_id(42) == 42 and as_id(" 7 ") == 7
    assert as_id(MAX_ID) == MAX_ID and as_id(str(MAX_ID)) == MAX_ID
    for bad in (0, -1, MAX_ID + 1, "1e3", "4.0", "", "x", "²", "٣", True, None, 3.0, [1]):
        assert as_id(bad) is None, bad
