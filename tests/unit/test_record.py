"""What a call reports to its caller about its upstream requests stays within metadata limits."""

from __future__ import annotations

from rerank_service.pipeline.record import MAX_REPORTED_IDS_CHARS, reported_ids


def test_a_few_ids_are_reported_whole_in_order() -> None:
    assert reported_ids(["a-1", "b-2", "c-3"]) == "a-1,b-2,c-3"
    assert reported_ids([]) == ""


def test_many_ids_are_cut_to_the_bound_and_say_how_many_were_left_out() -> None:
    ids = [f"{number:036d}" for number in range(400)]  # 37 characters each with its comma

    reported = reported_ids(ids)
    shown, _, more = reported.rpartition(",+")

    assert len(reported) <= MAX_REPORTED_IDS_CHARS + len(",+400 more")
    assert shown.split(",") == ids[: len(shown.split(","))]
    assert int(more.removesuffix(" more")) == 400 - len(shown.split(","))
