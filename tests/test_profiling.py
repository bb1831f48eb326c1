"""engine/profiling.py's idle-gap accounting and rank skew (pure; the GPU profile itself runs
in bench/parallel.py)."""

from engine.profiling import idle_gaps, ll_stamp_summary, rank_skew


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


def test_rank_skew_names_the_rank_that_reads_late():
    # rank 1 reads every call 100 us after rank 0; both queue a step in 200 us, then rank 0 (the
    # output rank) waits 100 us for the step before, rank 1 50 us; call 3 only rank 0 has (cut
    # off by ``last``): left out
    rank0 = [(1, 0.0, 0.0002, 0.000300, 0.000310), (2, 0.001, 0.0012, 0.001300, 0.001310),
             (3, 0.002, 0.0022, 0.0023, 0.0024)]
    rank1 = [(1, 0.0001, 0.0003, 0.000350, 0.000355), (2, 0.0011, 0.0013, 0.001350, 0.001355)]
    skew = rank_skew([rank0, rank1])
    assert skew["num_calls"] == 2
    r0, r1 = skew["ranks"]
    assert r0["late_read_us"] == {"median": 0.0, "p90": 0.0} and r0["last_to_read"] == 0
    assert r1["late_read_us"]["median"] == 100.0 and r1["last_to_read"] == 2
    assert r0["launch_us"]["median"] == r1["launch_us"]["median"] == 200.0
    assert r0["wait_us"]["median"] == 100.0 and r1["wait_us"]["median"] == 50.0
    assert r0["run_us"]["median"] == 300.0 and r1["run_us"]["median"] == 250.0
    assert r0["reply_us"]["median"] == 10.0 and r1["reply_us"]["median"] == 5.0
    # call 1's last reply at 355 us, call 2's first read at 1000 us
    assert skew["turnaround_us"] == {"median": 645.0, "p90": 645.0}


def test_rank_skew_without_stamps():
    assert rank_skew([]) == {"num_calls": 0, "ranks": []}
    assert rank_skew([[(1, 0.0, 0.1, 0.1, 0.2)], []]) == {"num_calls": 0, "ranks": []}


def test_ll_stamp_summary_splits_each_call_and_the_gaps_between():
    # (start, waited, peers in, end) ns, given out of order: sorted by start
    calls = [(10_000, 11_000, 14_000, 15_000),  # before 1 µs, peers 3, finish 1
             (0, 2_000, 4_000, 5_000)]  # before 2 µs, peers 2, finish 1
    summary = ll_stamp_summary(calls)
    assert summary["num_calls"] == 2
    assert summary["before_us"] == {"median": 2.0, "p90": 1.0}  # ordered [1, 2]: median is index 1
    assert summary["peers_us"]["median"] == 3.0 and summary["peers_us"]["p90"] == 2.0
    assert summary["finish_us"] == {"median": 1.0, "p90": 1.0}
    assert summary["after_wait_us"] == {"median": 4.0, "p90": 3.0}
    assert summary["between_us"] == {"median": 5.0, "p90": 5.0}  # 10,000 - 5,000 ns
    assert ll_stamp_summary([]) == {"num_calls": 0}
