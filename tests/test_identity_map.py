"""WeakIdentityMap: identity keys, no strong references."""

from __future__ import annotations

import gc

import pytest
import torch

from dist8bit.optim.identity_map import WeakIdentityMap


def test_keys_are_matched_by_identity_not_by_value():
    a, b = torch.zeros(3), torch.zeros(3)  # equal values, hash by id
    table: WeakIdentityMap[int] = WeakIdentityMap()
    table[a] = 1
    assert table.get(a) == 1 and table.get(b) is None and a in table and b not in table
    assert table.setdefault(b, 2) == 2 and table.setdefault(b, 3) == 2
    table[a] = 4
    assert table[a] == 4 and len(table) == 2 and sorted(table.values()) == [2, 4]
    del table[a]
    assert a not in table and len(table) == 1
    with pytest.raises(KeyError, match="keyed by identity"):
        table[a]


def test_an_entry_goes_with_its_key_and_a_reused_id_does_not_inherit_it():
    table: WeakIdentityMap[str] = WeakIdentityMap()
    key = torch.zeros(2)
    table[key] = "first"
    old_id = id(key)
    del key
    gc.collect()
    assert len(table) == 0 and list(table.items()) == []
    fresh = [torch.zeros(2) for _ in range(64)]  # CPython often hands a freed id to the next object
    assert all(table.get(t) is None for t in fresh), f"an id like {old_id} answered for a new tensor"


def test_the_map_does_not_keep_its_keys_alive_or_itself_through_them():
    key = torch.zeros(2)
    table: WeakIdentityMap[int] = WeakIdentityMap()
    table[key] = 1
    import weakref

    alive = weakref.ref(table)
    del table
    gc.collect()
    assert alive() is None  # the callback held by `key`'s weak reference does not own the map
    del key
    gc.collect()  # the orphaned callback runs without a map


def test_iteration_survives_keys_collected_meanwhile():
    keys = [torch.zeros(1) for _ in range(4)]
    table: WeakIdentityMap[int] = WeakIdentityMap()
    for i in range(len(keys)):  # no loop variable left holding a key
        table[keys[i]] = i
    seen = []
    for _key, value in table.items():  # _key keeps the first key alive until deleted below
        seen.append(value)
        keys.clear()  # drops every key during the walk
        gc.collect()
    assert seen == [0]  # the walk yields no key that died after it began
    del _key
    gc.collect()
    assert len(table) == 0
