"""KV pages: the allocator, an instance's pool of slots and pages, and the policy that admits and
preempts by pages. (Requests served over pages, preempted and aborted, are in test_engine.)"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from jds.engine.kv_pool import KVPool
from jds.scheduling import policy
from jds.scheduling.pages import PageAllocator


def test_pages_are_taken_whole_or_not_at_all_and_never_freed_twice():
    pages = PageAllocator(4)
    assert pages.take(3) == [0, 1, 2] and len(pages) == 1 and pages.used == 3
    assert pages.take(2) is None and len(pages) == 1  # nothing taken
    pages.give_back([1])
    assert pages.take(2) == [1, 3]
    with pytest.raises(RuntimeError, match="page 1 released while free"):
        pages.give_back([1, 1])


def test_a_pool_reserves_a_requests_context_grows_it_and_frees_it_whole():
    pool = KVPool(slots=2, pages=8, page_size=4, max_seq_len=32, cond=threading.Condition())
    slot = pool.try_reserve(5)  # positions 0-4 and the next token's, 5: two pages
    assert slot == 0 and pool.pages.used == 2 and list(pool.tables[0, :3]) == [0, 1, pool.no_page]
    assert pool.grow(0, 9) and pool.pages.used == 3 and pool.grow(0, 12) and pool.pages.used == 3
    # Positions 0-9 written into their pages; 10 and 11 past the length, 12 on past the pages held: dropped.
    written = pool.write_pages(0, np.arange(14), length=10)
    assert list(written) == [0] * 4 + [1] * 4 + [2] * 2 + [pool.no_page] * 4
    assert pool.step_tables(0, 2, 8).tolist() == [[0, 1], [pool.no_page] * 2]
    tables, step = pool.step_pages(0, 2, 8, np.array([0]), np.array([9, 0]))  # slot 0 writes position 9 (page 2); slot 1 is free
    assert tables.tolist() == [[0, 1], [pool.no_page] * 2] and step.tolist() == [[2], [pool.no_page]]
    assert not pool.grow(0, 40)  # 10 pages: more than there are; nothing taken
    assert pool.pages.used == 3
    pool.release(0)
    assert pool.pages.used == 0 and pool.free == 2 and (pool.tables == pool.no_page).all()
    with pytest.raises(RuntimeError):
        pool.release(0)  # the slot is free already


def test_admission_leaves_a_reserve_for_running_requests_but_always_admits_one_onto_an_idle_instance():
    assert policy.admission_pages(15, 16) == 1 and policy.admission_pages(16, 16) == 2
    # 200 pages keep 2 in reserve once any is in use.
    assert policy.admits([100, 99], free_slots=4, free_pages=200, total_pages=200) == 1
    assert policy.admits([100, 98], free_slots=4, free_pages=200, total_pages=200) == 2
    assert policy.admits([200], free_slots=1, free_pages=200, total_pages=200) == 1
    assert policy.admits([1, 1, 1], free_slots=2, free_pages=200, total_pages=200) == 2  # slots cap it
    assert policy.admits([5, 1], free_slots=2, free_pages=4, total_pages=200) == 0  # the head is never skipped


def test_the_youngest_running_request_is_preempted():
    assert policy.preemption_victim({0: 3.0, 1: 7.5, 2: 1.0}) == 1
    assert policy.context_buckets(100, 16) == [16, 32, 64, 112]
    assert policy.context_buckets(2048, 64) == [64, 128, 256, 512, 1024, 2048]


def test_an_instances_pages_come_from_kv_pages_or_kv_memory_gb_or_its_rows_and_the_fit_check_counts_them():
    from pydantic import ValidationError

    from jds.config.fit import instance_pages, memory_needs, page_bytes
    from jds.config.placement import ColocatedInstance, Placement
    from jds.model.architecture import Architecture

    arch = Architecture(vocab_size=100, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4, num_kv_heads=2)
    one_page = page_bytes(arch, 4, 16)
    assert one_page == 2 * 4 * 2 * 16 * 16 * 4  # K and V, 4 layers, 2 KV heads of 16, 16 positions, float32
    default = ColocatedInstance(devices=[0], slots=4, page_size=16).resolved(100)
    assert instance_pages(default, arch, 4, 16) == 4 * 7  # four rows of 100 positions: 7 pages each
    assert instance_pages(ColocatedInstance(devices=[0], kv_pages=5).resolved(100), arch, 4, 16) == 5
    assert instance_pages(ColocatedInstance(devices=[0], kv_memory_gb=1.0).resolved(100), arch, 4, 16) == 2**30 // one_page
    with pytest.raises(ValidationError, match="give kv_pages or kv_memory_gb, not both"):
        ColocatedInstance(devices=[0], kv_pages=5, kv_memory_gb=1.0)
    small, large = (Placement(instances=[{"devices": [0], "kv_pages": n, "page_size": 16}]) for n in (10, 1000))
    (need_small,), (need_large,) = memory_needs(small, arch, 4, 100), memory_needs(large, arch, 4, 100)
    assert (need_small.kv, need_large.kv) == (10 * one_page, 1000 * one_page)


def test_a_pages_key_names_every_token_before_its_end():
    from jds.scheduling.pages import page_keys

    a = page_keys(list(range(40)), 16)
    assert len(a) == 2  # full pages only
    assert page_keys(list(range(32)) + [7], 16) == a
    assert page_keys([99] + list(range(1, 40)), 16)[1] != a[1]  # same second page, other first page: another key


def test_cached_pages_outlive_their_holders_are_shared_and_evicted_least_recently_used_first():
    from jds.scheduling.pages import PageAllocator

    pages = PageAllocator(4, cache=True)
    first, second = pages.take(2), pages.take(1)
    pages.register([b"a", b"b"], first)
    pages.register([b"c"], second)
    pages.give_back(first + second)
    assert (pages.used, pages.cached, len(pages)) == (3, 3, 4)  # cached, and all can be taken
    assert pages.lookup([b"a", b"b", b"x"]) == first and pages.lookup([b"b"]) == first[1:]
    pages.share(first[:1])  # "a" is held again: not evictable
    taken = pages.take(2)  # the free page, then the least recently cached one held by no one: "b"
    assert sorted(taken) == sorted([3, first[1]])
    assert pages.lookup([b"a", b"b"]) == first[:1] and pages.lookup([b"c"]) == second
    assert pages.take(2) is None and pages.take(1) == second and pages.lookup([b"c"]) == []
    pages.give_back([*taken, *second, first[0]])
    pages.drop_cache()
    assert (pages.used, pages.cached, len(pages)) == (0, 0, 4)


def test_a_pool_shares_a_cached_prefix_but_never_a_prompts_last_token():
    pool = KVPool(slots=3, pages=16, page_size=4, max_seq_len=32, cond=threading.Condition(), prefix_caching=True)
    prompt = list(range(100, 110))  # 10 tokens: pages [0-3], [4-7] full
    slot, reused = pool.reserve_reusing(prompt)
    assert reused == 0
    pool.register(slot, prompt)
    assert pool.pages.cached == 2
    again, reused = pool.reserve_reusing(prompt + [5, 6])  # its first 8 positions are cached
    assert reused == 8 and list(pool.tables[again, :2]) == list(pool.tables[slot, :2])
    exact, reused = pool.reserve_reusing(prompt[:8])  # 8 tokens: the last one is computed, so page 2 is not shared
    assert reused == 4 and pool.tables[exact, 0] == pool.tables[slot, 0] and pool.tables[exact, 1] != pool.tables[slot, 1]
    for s in (slot, again, exact):
        pool.release(s)
    assert pool.pages.used == pool.pages.cached == 2
    assert (pool.prefix_queried, pool.prefix_hits) == (10 + 12 + 8, 12)


def test_without_slots_an_instance_runs_32_rows_over_the_pages_of_8_whole_sequences():
    from jds.config.placement import DEFAULT_PAGE_SIZE, ColocatedInstance, DecodeInstance

    default = ColocatedInstance(devices=[0]).resolved(2048)
    assert (default.slots, default.kv_pages, default.max_seq_len) == (32, 8 * 2048 // DEFAULT_PAGE_SIZE, 2048)
    given = DecodeInstance(devices=[0], slots=4, max_seq_len=100, page_size=16).resolved(2048)
    assert (given.slots, given.kv_pages, given.max_seq_len) == (4, 4 * 7, 100)  # slots given: the memory of that many rows, as before pages
    sized = ColocatedInstance(devices=[0], kv_memory_gb=1.0).resolved(2048)
    assert sized.slots == 32 and sized.kv_pages is None  # pages from memory, once the model's page bytes are known
    with pytest.raises(ValueError, match="not resolved"):
        ColocatedInstance(devices=[0]).num_pages(1000)


def test_a_thousand_requests_ending_every_way_in_a_tiny_pool_leave_only_the_cache():
    """1,000 requests through 4 slots and 12 pages of 4 positions, with shared prompt prefixes so
    that pages are shared, cached and evicted. Each ends finished (its tokens registered, as
    ``DecodeBatch.leave`` does), aborted or past its deadline (freed as it stands), and many are
    preempted on the way (freed at once, then admitted again with their tokens so far) when a
    running request cannot grow. After every operation each page is either available or listed by
    a running request's table, never both (a double free raises); at the end the pages in use are
    exactly the cached ones, and dropping the cache leaves none."""
    rng = np.random.default_rng(0)
    pool = KVPool(slots=4, pages=12, page_size=4, max_seq_len=32, cond=threading.Condition(), prefix_caching=True)
    prefixes = [list(rng.integers(0, 1000, 8)) for _ in range(3)]
    waiting = [[*prefixes[i % 3], *rng.integers(0, 1000, 1 + i % 7)] for i in range(1000)]  # each request's tokens so far
    running: dict[int, list[int]] = {}  # slot -> its tokens, the newest not yet in the cache
    ended = {"finished": 0, "aborted": 0, "expired": 0, "preempted": 0}

    def check() -> None:
        held = {int(p) for slot in running for p in pool.tables[slot] if p != pool.no_page}
        assert len(pool.pages) + len(held) == pool.pages.total
        assert all((pool.tables[slot] == pool.no_page).all() for slot in range(pool.size) if slot not in running)

    while waiting or running:
        if waiting and rng.random() < 0.5:
            got = pool.reserve_reusing(waiting[0][:-1])
            if got is not None:
                running[got[0]] = waiting.pop(0)
        for slot in list(running):
            if slot not in running:  # preempted by an older request this round
                continue
            tokens = running[slot]
            fate = rng.random()
            if fate < 0.05 or len(tokens) >= 31:
                pool.register(slot, tokens[:-1])
                ended["finished"] += 1
            elif fate < 0.08:
                ended["aborted" if fate < 0.065 else "expired"] += 1
            elif pool.grow(slot, len(tokens) + 1):
                tokens.append(int(rng.integers(0, 1000)))
                check()
                continue
            else:  # the youngest (maybe this one) goes back to the front of the queue
                victim = list(running)[-1]
                waiting.insert(0, running.pop(victim))
                pool.release(victim)
                ended["preempted"] += 1
                check()
                continue
            del running[slot]
            pool.release(slot)
            check()
    assert ended["finished"] + ended["aborted"] + ended["expired"] == 1000 and min(ended.values()) > 10, ended
    assert pool.prefix_hits > 0 and pool.free == pool.size
    assert pool.pages.used == pool.pages.cached > 0
    pool.drop_cache()
    assert pool.pages.used == 0 and len(pool.pages) == pool.pages.total


def test_routing_room_counts_the_pages_running_requests_commit_not_those_they_hold_yet():
    pool = KVPool(slots=2, pages=16, page_size=4, max_seq_len=32, cond=threading.Condition())
    assert pool.room == (True, 16)
    a = pool.try_reserve(5, final_len=30)  # holds 2 pages now, commits 8 (30 positions)
    assert pool.pages.used == 2 and pool.room == (True, 8)
    b = pool.try_reserve(9)  # no final length given: commits what it holds (3 pages)
    assert pool.room == (False, 5)  # no free slot: routing sees no room whatever the pages
    assert policy.most_room([pool.room, (True, 0)]) == 1 and policy.most_room([(True, 3), (True, 9)]) == 1
    pool.release(a)
    assert pool.room == (True, 13)
    pool.release(b)
    assert pool.room == (True, 16) and pool.committed == 0
