"""<loc> detection decoding: hand-worked examples, segmentation codes, junk tolerance, round trip."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgconv.model.detection import Box, loc_tokens, parse_detections


def test_two_boxes_in_pixels():
    text = "<loc0256><loc0000><loc0768><loc0512> cat ; <loc0000><loc0512><loc1023><loc1023> big dog"
    boxes = parse_detections(text, width=640, height=480)
    assert boxes == [
        Box("cat", x0=0.0, y0=120.0, x1=320.0, y1=360.0),  # y/1024*480, x/1024*640
        Box("big dog", x0=320.0, y0=0.0, x1=640 * 1023 / 1024, y1=480 * 1023 / 1024),
    ]
    assert boxes[0].xyxy == (0.0, 120.0, 320.0, 360.0)


def test_segmentation_codes_and_missing_label():
    segs = "".join(f"<seg{i:03d}>" for i in range(100, 116))
    boxes = parse_detections(f"<loc0001><loc0002><loc0003><loc0004>{segs} wheel;<loc0001><loc0002><loc0003><loc0004>",
                             1024, 1024)
    assert boxes[0].seg == tuple(range(100, 116)) and boxes[0].label == "wheel"
    assert boxes[1].seg is None and boxes[1].label == "" and boxes[1].xyxy == (2.0, 1.0, 4.0, 3.0)


@pytest.mark.parametrize("text", ["", "no boxes here", "<loc0001><loc0002><loc0003> truncated", "<loc9999>" * 4 + " x",
                                  "<seg001><seg002> only segs"])
def test_junk_gives_no_boxes(text):
    assert parse_detections(text, 10, 10) == []


def test_bad_size():
    with pytest.raises(ValueError, match="positive"):
        parse_detections("", 0, 10)


@given(
    w=st.integers(1, 4000), h=st.integers(1, 4000),
    fx=st.lists(st.floats(0, 1, exclude_max=True), min_size=4, max_size=4),
)
def test_round_trip_within_one_bin(w, h, fx):
    x0, y0, x1, y1 = fx[0] * w, fx[1] * h, fx[2] * w, fx[3] * h
    (box,) = parse_detections(loc_tokens(x0, y0, x1, y1, w, h) + " thing", w, h)
    for got, want, side in [(box.x0, x0, w), (box.y0, y0, h), (box.x1, x1, w), (box.y1, y1, h)]:
        assert 0 <= want - got < side / 1024 + 1e-9 * side
    assert box.label == "thing"
