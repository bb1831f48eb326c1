"""engine/profiling.py's idle-gap accounting (pure; the GPU profile itself runs in bench/parallel.py)."""

from engine.profiling import idle_gaps


def test_idle_gaps_classify_by_length_and_name_the_kernel_after():
    spans = [(0.0, 10.0, "a"), (11.0, 20.0, "b"),  # 1 us launch gap before b
             (25.0, 30.0, "nccl"),                  # 5 us before nccl
             (28.0, 40.0, "other_stream"),          # overlaps: no gap
             (240.0, 250.0, "a")]                   # 200 us between steps before a
    idle, before = idle_gaps(spans, steps=2)
    assert idle == {"under_2us": 0.5, "2_to_10us": 2.5, "10_to_100us": 0.0, "over_100us": 100.0}
    assert [(r.name, r.us_per_step, r.calls_per_step) for r in before] == [
        ("a", 100.0, 0.5), ("nccl", 2.5, 0.5), ("b", 0.5, 0.5)]


def test_no_gaps():
    idle, before = idle_gaps([(0.0, 5.0, "a"), (5.0, 9.0, "b")], steps=1)
    assert sum(idle.values()) == 0 and before == []
