import threading

import pytest

from engine.cache import LRUCache


def test_least_recently_used_goes_first_and_is_evicted():
    gone = []
    c = LRUCache(2, on_evict=gone.append)
    c.put("a", 1)
    c.put("b", 2)
    assert c.get("a") == 1  # a is now the most recent
    c.put("c", 3)
    assert gone == [2] and "b" not in c and c.get("a") == 1 and c.get("c") == 3


def test_get_or_build_builds_once_per_key_and_replacing_evicts_the_old_value():
    gone, built = [], []
    c = LRUCache(4, on_evict=gone.append)
    for _ in range(3):
        assert c.get_or_build("k", lambda: built.append(1) or "v") == "v"
    assert built == [1]
    c.put("k", "w")
    assert gone == ["v"]
    c.pop_where(lambda key: key == "k")
    assert gone == ["v", "w"] and len(c) == 0
    with pytest.raises(ValueError):
        LRUCache(0)


def test_threads_never_exceed_the_bound():
    c = LRUCache(8)

    def work(n):
        for i in range(500):
            c.get_or_build((n, i % 20), lambda i=i: i)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(c) <= 8


def test_a_weighted_cache_is_bounded_by_the_sum_of_weights():
    c = LRUCache(100, weight=len)
    for i in range(3):
        c.put(i, bytes(40))
    assert 0 not in c and c.keys() == [1, 2]
    c.get(1)
    c.put(3, bytes(40))  # 1 was used last, so 2 goes
    assert c.keys() == [1, 3]
    c.put("big", bytes(101))  # heavier than the whole cache: not kept, nothing evicted
    assert "big" not in c and c.keys() == [1, 3]
    c.pop(1)
    c.put(4, bytes(60))
    assert c.keys() == [3, 4]
