"""A map keyed by tensor identity that does not keep its keys alive.

The optimizer looks every parameter up in a few such maps on every step
(recorded size, rounding stream, flat-buffer segments, overrides). torch's
WeakIdKeyDictionary builds a weak reference object for each lookup, about 1 µs
apiece; here a lookup is one dict probe on id() and one identity check, about
0.1 µs, which matters once a model has hundreds of parameters and the kernel
itself takes a millisecond (a GPU step).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, MutableMapping
from typing import Generic, TypeVar

from torch.utils.weak import WeakIdRef

V = TypeVar("V")


class WeakIdentityMap(MutableMapping, Generic[V]):
    """Objects (tensors, modules) to values, by identity; an entry goes when its key is collected.

    Each entry holds a WeakIdRef (torch's weak reference that copes with tensor
    PyObject resurrection) whose callback removes the entry. The callback keeps
    only a weak reference to the map, so a map never outlives its owner through
    its keys. Lookups compare the referent with the key, so an entry whose key
    died with the callback still pending cannot answer for a new object that
    reuses the id.
    """

    def __init__(self) -> None:
        self._entries: dict[int, tuple[WeakIdRef, V]] = {}
        self_ref = weakref.ref(self)

        def forget(ref: WeakIdRef) -> None:
            owner = self_ref()
            if owner is not None:
                entry = owner._entries.get(ref._id)
                if entry is not None and entry[0] is ref:
                    del owner._entries[ref._id]

        self._forget = forget

    @classmethod
    def from_items(cls, items: list[tuple[object, V]]) -> WeakIdentityMap[V]:
        table: WeakIdentityMap[V] = cls()
        for key, value in items:
            table[key] = value
        return table

    def __reduce__(self) -> tuple:
        # Copied and pickled as its live (key, value) pairs: copy.deepcopy and pickle then map each key
        # through their memo, so a copied optimizer's entries point at its copied parameters.
        return (type(self).from_items, (list(self.items()),))

    def _entry(self, key: object) -> tuple[WeakIdRef, V] | None:
        entry = self._entries.get(id(key))
        if entry is not None and weakref.ref.__call__(entry[0]) is key:
            return entry
        return None

    def get(self, key: object, default: V | None = None) -> V | None:
        entry = self._entry(key)
        return default if entry is None else entry[1]

    def __getitem__(self, key: object) -> V:
        entry = self._entry(key)
        if entry is None:
            raise KeyError(f"no entry for this {type(key).__name__} (entries are keyed by identity)")
        return entry[1]

    def __contains__(self, key: object) -> bool:
        return self._entry(key) is not None

    def __setitem__(self, key: object, value: V) -> None:
        entry = self._entry(key)
        ref = entry[0] if entry is not None else WeakIdRef(key, self._forget)
        self._entries[id(key)] = (ref, value)

    def setdefault(self, key: object, default: V | None = None) -> V:
        entry = self._entry(key)
        if entry is not None:
            return entry[1]
        self[key] = default
        return default

    def __delitem__(self, key: object) -> None:
        if self._entry(key) is None:
            raise KeyError(f"no entry for this {type(key).__name__} (entries are keyed by identity)")
        del self._entries[id(key)]

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[object]:
        for key, _ in self.items():
            yield key

    def items(self) -> Iterator[tuple[object, V]]:  # type: ignore[override]
        # A snapshot: a key collected mid-iteration runs the callback, which must not resize the dict being walked.
        for ref, value in list(self._entries.values()):
            key = weakref.ref.__call__(ref)
            if key is not None:
                yield key, value
