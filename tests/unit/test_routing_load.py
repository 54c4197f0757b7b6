"""bench/routing_load.py's conversations: the open loop takes them again once it has sent
them all, and every turn's request id must still name group, conversation and take."""

from __future__ import annotations

import argparse

from bench.routing_load import conversations, retake


def test_a_conversation_taken_again_keeps_its_group_and_gets_a_name_and_questions_of_its_own(
) -> None:
    args = argparse.Namespace(seed=0, groups=2, conversations=4, turns=2, system_words=5)
    convs = conversations(args)
    assert [c["name"] for c in convs] == ["g0-c0", "g1-c1", "g0-c2", "g1-c3"]
    assert retake(convs[1], 0) is convs[1]
    again = [retake(c, 2) for c in convs]
    assert [c["name"] for c in again] == ["g0-c0-a2", "g1-c1-a2", "g0-c2-a2", "g1-c3-a2"]
    for before, after in zip(convs, again, strict=True):
        assert after["system"] == before["system"]
        assert len(after["turns"]) == 2 and not set(after["turns"]) & set(before["turns"])
