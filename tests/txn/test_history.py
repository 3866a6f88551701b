from replfs.txn import BlockRange, HistoryRecorder, check_serializable


def test_notes_example_is_not_conflict_serializable():
    # T1 read x, T2 write x, T1 write x, T3 write x  (6.033 notes)
    result = check_serializable([(1, "r", "x"), (2, "w", "x"), (1, "w", "x"), (3, "w", "x")])
    assert not result
    assert set(result.cycle) == {1, 2}


def test_serial_history_is_serializable_with_order():
    h = [(1, "r", "x"), (1, "w", "x"), (2, "r", "x"), (2, "w", "y"), (3, "r", "y")]
    result = check_serializable(h)
    assert result and result.order == [1, 2, 3]


def test_reads_alone_never_conflict():
    h = [(1, "r", "x"), (2, "r", "x"), (2, "r", "y"), (1, "r", "y")]
    assert check_serializable(h).edges == 0


def test_block_ranges_conflict_only_when_overlapping():
    disjoint = [(1, "r", BlockRange(7, 0, 8)), (2, "w", BlockRange(7, 8, 16)),
                (2, "r", BlockRange(7, 16, 24)), (1, "w", BlockRange(7, 16, 20))]
    assert check_serializable(disjoint)    # only 2 -> 1
    overlapping = [(1, "r", BlockRange(7, 0, 9)), (2, "w", BlockRange(7, 8, 16)),
                   (2, "r", BlockRange(7, 16, 24)), (1, "w", BlockRange(7, 16, 20))]
    result = check_serializable(overlapping)
    assert not result and set(result.cycle) == {1, 2}
    other_block = [(1, "r", BlockRange(7, 0, 9)), (2, "w", BlockRange(8, 8, 16)),
                   (2, "r", BlockRange(7, 16, 24)), (1, "w", BlockRange(7, 16, 20))]
    assert check_serializable(other_block)


def test_recorder_counts_only_committed_transactions():
    rec = HistoryRecorder()
    rec.read(1, "x"); rec.write(2, "x"); rec.write(1, "x"); rec.write(3, "x")
    rec.commit(1); rec.commit(3); rec.abort(2)
    assert check_serializable(rec)          # T2 aborted: 1 -> 3 only
    rec.commit(2)
    rec.aborted.discard(2)
    assert not check_serializable(rec)


def test_long_cycle_is_reported_in_edge_order():
    h = []
    for i in range(1, 6):
        h.append((i, "w", f"k{i}"))
    for i in range(1, 6):
        h.append((i, "r", f"k{i % 5 + 1}"))
    result = check_serializable(h)
    assert not result
    cyc = result.cycle
    assert sorted(cyc) == [1, 2, 3, 4, 5]
    # each transaction on the cycle has an edge to the next one
    for a, b in zip(cyc, cyc[1:] + cyc[:1]):
        assert (a, b) in {(i % 5 + 1, i) for i in range(1, 6)}


def test_merged_streams_find_a_cycle_across_namespaces(tmp_path):
    """Each group's history alone is serializable; merged, the two distributed
    transactions (aliases) form a cycle -- and a part aborted where another part
    committed is an atomicity problem."""
    from replfs.txn.history import merge_streams
    h0 = HistoryRecorder(stream=str(tmp_path / "g0"))
    h1 = HistoryRecorder(stream=str(tmp_path / "g1"))
    x = BlockRange(7, 0, 8)
    # group 0: G1 writes x, then G2 reads it (G1 -> G2)
    h0.write(1, x)
    h0.read(2, x)
    # group 1 (same block number, another object): G2 writes y, then G1 reads it (G2 -> G1)
    h1.write(5, x)
    h1.read(6, x)
    for h, a, b in ((h0, 1, 2), (h1, 6, 5)):
        h.alias(a, "G1")
        h.alias(b, "G2")
        for t in (a, b):
            h.commit(t)
            h.confirm(t)
    h0.close()
    h1.close()
    alone = [merge_streams({g: [str(tmp_path / f"g{g}")]}) for g in (0, 1)]
    assert all(check_serializable(ev, com) for ev, com, _ in alone)
    events, committed, problems = merge_streams({0: [str(tmp_path / "g0")],
                                                 1: [str(tmp_path / "g1")]})
    assert committed == {"G1", "G2"} and problems == []
    result = check_serializable(events, committed)
    assert not result and set(result.cycle) == {"G1", "G2"}
    # a write whose commit was never confirmed (lost with its primary) does not count
    h2 = HistoryRecorder(stream=str(tmp_path / "g2"))
    h2.write(1, x)
    h2.commit(1)
    h2.abort(3)
    h2.alias(3, "G1")
    h2.close()
    events, committed, problems = merge_streams({0: [str(tmp_path / "g0")],
                                                 1: [str(tmp_path / "g1"), str(tmp_path / "g2")]})
    assert committed == {"G1", "G2"}
    assert problems == ["G1 committed in one group and aborted in another"]
