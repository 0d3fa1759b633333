"""The storage seam: one suite that every backend passes (zarr's ``StoreTests`` habit), run on a
local folder and on S3 through moto's server, plus a Hypothesis state machine checking each
backend against a plain dict."""

from __future__ import annotations

import gc
import pickle
import threading
import uuid
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule, run_state_machine_as_test

from strata.store.storage import FsspecStorage, LocalStorage, Storage, open_storage


class StorageTests:
    """Subclasses provide ``new_storage`` (a factory of storages on fresh roots) and ``other``
    (a second, independent instance on the root of ``storage``)."""

    @pytest.fixture
    def new_storage(self) -> Callable[[], Storage]:
        raise NotImplementedError

    @pytest.fixture
    def storage(self, new_storage: Callable[[], Storage]) -> Storage:
        return new_storage()

    @pytest.fixture
    def other(self, storage: Storage) -> Storage:
        raise NotImplementedError

    # -- read / write -----------------------------------------------------------------------

    def test_round_trip(self, storage: Storage) -> None:
        data = bytes(range(256)) * 41
        storage.write("a/b/blob.bin", data)
        assert bytes(storage.read("a/b/blob.bin")) == data
        assert storage.size("a/b/blob.bin") == len(data)

    def test_write_replaces_whole_object(self, storage: Storage) -> None:
        storage.write("k/v", b"x" * 1000)
        storage.write("k/v", b"short")
        assert bytes(storage.read("k/v")) == b"short"
        assert storage.size("k/v") == 5
        # No temporary or partial file is left beside it.
        assert storage.list("k") == ["k/v"]

    def test_write_is_atomic_for_concurrent_readers(self, storage: Storage) -> None:
        a, b = b"A" * (256 << 10), b"B" * (96 << 10)
        storage.write("atomic/obj", a)
        stop = threading.Event()

        def flip() -> None:
            i = 0
            while not stop.is_set():
                storage.write("atomic/obj", b if i % 2 == 0 else a)
                i += 1

        seen = set()
        with ThreadPoolExecutor(1) as pool:
            fut = pool.submit(flip)
            try:
                for _ in range(40):
                    got = bytes(storage.read("atomic/obj"))
                    assert got in (a, b), f"read a mix of old and new bytes ({len(got)} bytes)"
                    seen.add(got[:1])
            finally:
                stop.set()
                fut.result()
        assert seen  # at least one full read

    def test_write_list_of_buffers_concatenates(self, storage: Storage) -> None:
        storage.write("parts/x", [b"ab", bytearray(b"cd"), memoryview(b"ef"), b""])
        assert bytes(storage.read("parts/x")) == b"abcdef"

    def test_write_single_memoryview(self, storage: Storage) -> None:
        # `Buffers` allows a memoryview (the shard writer hands over NumPy memory), alone or as
        # the one part of a list.
        storage.write("mv/x", memoryview(b"abc"))
        assert bytes(storage.read("mv/x")) == b"abc"
        storage.write("mv/y", [memoryview(bytes(range(10)))])
        assert bytes(storage.read("mv/y")) == bytes(range(10))

    def test_write_empty_object(self, storage: Storage) -> None:
        storage.write("e/empty", b"")
        assert bytes(storage.read("e/empty")) == b""
        assert storage.size("e/empty") == 0
        assert storage.exists("e/empty")

    def test_read_range(self, storage: Storage) -> None:
        data = bytes(range(256))
        storage.write("r/x", data)
        assert bytes(storage.read_range("r/x", 10, 20)) == data[10:20]
        assert bytes(storage.read_range("r/x", 0, 256)) == data
        assert bytes(storage.read_range("r/x", 250, 256)) == data[250:]
        assert bytes(storage.read_range("r/x", 255, 256)) == data[255:]

    def test_read_range_empty(self, storage: Storage) -> None:
        storage.write("r/x", bytes(range(256)))
        assert bytes(storage.read_range("r/x", 7, 7)) == b""

    def test_map_is_the_whole_object(self, storage: Storage) -> None:
        data = bytes(range(200))
        storage.write("map/x", data)
        assert bytes(memoryview(storage.map("map/x")).cast("B")) == data

    def test_read_into(self, storage: Storage) -> None:
        data = bytes(range(100))
        storage.write("into/x", data)
        big = bytearray(b"\xee" * 150)
        assert storage.read_into("into/x", memoryview(big)) == 100
        assert bytes(big[:100]) == data and bytes(big[100:]) == b"\xee" * 50
        small = bytearray(40)
        assert storage.read_into("into/x", memoryview(small)) == 40
        assert bytes(small) == data[:40]

    @pytest.mark.parametrize(
        "op",
        [
            lambda s: s.read("missing/key"),
            lambda s: s.read_range("missing/key", 0, 4),
            lambda s: s.size("missing/key"),
            lambda s: s.map("missing/key"),
            lambda s: s.read_into("missing/key", memoryview(bytearray(4))),
        ],
        ids=["read", "read_range", "size", "map", "read_into"],
    )
    def test_missing_key_raises_file_not_found(self, storage: Storage, op: Callable[[Storage], object]) -> None:
        storage.write("missing/other", b"x")  # the folder exists; the key does not
        with pytest.raises(FileNotFoundError):
            op(storage)

    def test_exists_size_delete(self, storage: Storage) -> None:
        assert not storage.exists("d/x")
        storage.write("d/x", b"12345")
        assert storage.exists("d/x")
        assert storage.size("d/x") == 5
        storage.delete("d/x")
        assert not storage.exists("d/x")
        with pytest.raises(FileNotFoundError):
            storage.read("d/x")
        storage.delete("d/x")  # deleting a missing key is not an error
        storage.delete("never/was/here")

    # -- listing ----------------------------------------------------------------------------

    def test_list_recursive_sorted(self, storage: Storage) -> None:
        keys = ["p/c", "p/a/z", "pp/e", "p/b", "q/d", "p/a/y/x", "p/a/y/w"]
        for i, k in enumerate(keys):
            storage.write(k, str(i).encode())
        assert storage.list("p") == ["p/a/y/w", "p/a/y/x", "p/a/z", "p/b", "p/c"]
        assert storage.list("p/a") == ["p/a/y/w", "p/a/y/x", "p/a/z"]
        assert storage.list("p/a/y") == ["p/a/y/w", "p/a/y/x"]
        assert storage.list("q") == ["q/d"]
        assert storage.list("nothing") == []

    def test_list_root_level_keys(self, storage: Storage) -> None:
        storage.write("top", b"1")
        storage.write("sub/leaf", b"2")
        assert storage.list("") == ["sub/leaf", "top"]

    def test_list_is_fresh(self, storage: Storage, other: Storage) -> None:
        storage.write("f/a", b"1")
        storage.write("f/b", b"2")
        assert storage.list("f") == ["f/a", "f/b"]  # any cache is now warm
        assert storage.list_dirs("") == ["f"]
        other.write("f/c", b"3")
        other.write("f/sub/d", b"4")
        other.delete("f/a")
        other.write("f/b", b"two")
        assert storage.list("f") == ["f/b", "f/c", "f/sub/d"]
        assert storage.list_dirs("f") == ["sub"]
        assert not storage.exists("f/a")
        assert storage.exists("f/c")
        assert storage.size("f/b") == 3
        assert bytes(storage.read("f/b")) == b"two"
        other.write("g/x", b"5")
        assert storage.list_dirs("") == ["f", "g"]

    def test_list_dirs(self, storage: Storage) -> None:
        for k in ["d/y/2/3", "d/x/1", "d/file", "d/z.bin", "e/w"]:
            storage.write(k, b"")
        assert storage.list_dirs("d") == ["x", "y"]
        assert storage.list_dirs("d/y") == ["2"]
        assert storage.list_dirs("d/x") == []
        assert storage.list_dirs("missing") == []

    # -- put_if_absent ------------------------------------------------------------------------

    def test_put_if_absent_once(self, storage: Storage) -> None:
        assert storage.put_if_absent("c/rec.json", b"first") is True
        assert storage.put_if_absent("c/rec.json", b"second") is False
        assert storage.put_if_absent("c/rec.json", b"third, longer than the first") is False
        assert bytes(storage.read("c/rec.json")) == b"first"
        assert storage.list("c") == ["c/rec.json"]

    def test_put_if_absent_never_overwrites_a_written_key(self, storage: Storage) -> None:
        storage.write("c/w", b"written")
        assert storage.put_if_absent("c/w", b"other") is False
        assert bytes(storage.read("c/w")) == b"written"
        storage.delete("c/w")
        assert storage.put_if_absent("c/w", b"again") is True
        assert bytes(storage.read("c/w")) == b"again"

    def test_put_if_absent_race_has_one_winner(self, storage: Storage) -> None:
        n = 8
        for trial in range(4):
            key = f"race/{trial}.json"
            barrier = threading.Barrier(n)
            payloads = [f"writer {i} ".encode() * (2000 + i) for i in range(n)]

            def go(i: int, barrier: threading.Barrier = barrier, key: str = key, payloads: list[bytes] = payloads) -> bool:
                barrier.wait(timeout=30)
                return storage.put_if_absent(key, payloads[i])

            with ThreadPoolExecutor(n) as pool:
                won = list(pool.map(go, range(n)))
            winners = [i for i, w in enumerate(won) if w]
            assert len(winners) == 1, f"trial {trial}: winners {winners}"
            assert bytes(storage.read(key)) == payloads[winners[0]]
        assert storage.list("race") == [f"race/{t}.json" for t in range(4)]

    # -- the state machine ----------------------------------------------------------------------

    def test_state_machine_against_dict(self, new_storage: Callable[[], Storage]) -> None:
        machine = type("Machine", (StorageMachine,), {"new_storage": staticmethod(new_storage)})
        run_state_machine_as_test(
            machine,
            settings=settings(max_examples=self.machine_examples, stateful_step_count=15, deadline=None, database=None),
        )

    machine_examples = 20


KEYS = st.sampled_from(["a/k1", "a/k2", "a/b/k3", "a/b/c/k4", "e/k5"])
VALUES = st.binary(max_size=48)


class StorageMachine(RuleBasedStateMachine):
    """A storage on a fresh root behaves like a dict of bytes."""

    new_storage: Callable[[], Storage]

    def __init__(self) -> None:
        super().__init__()
        self.storage = self.new_storage()
        self.model: dict[str, bytes] = {}

    @rule(key=KEYS, value=VALUES)
    def write(self, key: str, value: bytes) -> None:
        self.storage.write(key, value)
        self.model[key] = value

    @rule(key=KEYS, value=VALUES)
    def put_if_absent(self, key: str, value: bytes) -> None:
        created = self.storage.put_if_absent(key, value)
        assert created == (key not in self.model)
        self.model.setdefault(key, value)

    @rule(key=KEYS)
    def delete(self, key: str) -> None:
        self.storage.delete(key)
        self.model.pop(key, None)

    @rule(key=KEYS)
    def read(self, key: str) -> None:
        assert self.storage.exists(key) == (key in self.model)
        if key in self.model:
            assert bytes(self.storage.read(key)) == self.model[key]
            assert self.storage.size(key) == len(self.model[key])
        else:
            with pytest.raises(FileNotFoundError):
                self.storage.read(key)

    @rule(prefix=st.sampled_from(["a", "a/b", "e"]))
    def list(self, prefix: str) -> None:
        assert self.storage.list(prefix) == sorted(k for k in self.model if k.startswith(prefix + "/"))

    def teardown(self) -> None:
        for prefix in ("a", "e"):
            assert self.storage.list(prefix) == sorted(k for k in self.model if k.startswith(prefix + "/"))


# -- backends ---------------------------------------------------------------------------------


class TestLocalStorage(StorageTests):
    machine_examples = 40

    @pytest.fixture
    def new_storage(self, tmp_path) -> Callable[[], Storage]:
        return lambda: LocalStorage(tmp_path / uuid.uuid4().hex)

    @pytest.fixture
    def other(self, storage: Storage) -> Storage:
        return LocalStorage(storage.root)

    def test_open_storage_picks_local(self, tmp_path) -> None:
        assert isinstance(open_storage(tmp_path / "x"), LocalStorage)
        s = open_storage(f"file://{tmp_path}/y")
        assert isinstance(s, LocalStorage) and s.root == tmp_path / "y"

    def test_list_root_level_keys(self, storage: Storage) -> None:
        super().test_list_root_level_keys(storage)

    def test_kept_maps_are_bounded_by_bytes(self, storage: LocalStorage, monkeypatch) -> None:
        # Kept maps hold their touched pages in RSS: a long read of many shards must not keep
        # them all. Least recently used go first; the newest is kept even alone over the budget.
        monkeypatch.setattr(LocalStorage, "_MAPS_BYTES", 10_000)
        for i in range(6):
            storage.write(f"m/{i}", bytes([i]) * 4000)
        first = weakref.ref(storage.map("m/0"))
        held = storage.map("m/1")  # an array the caller keeps stays valid after its map is dropped
        for i in range(2, 6):
            storage.map(f"m/{i}")
        storage.map("m/4")  # a hit: now the most recent
        assert list(storage._maps) == ["m/5", "m/4"]
        gc.collect()
        assert first() is None  # dropped and no longer viewed: closed
        assert bytes(held) == b"\x01" * 4000
        assert bytes(storage.read_range("m/0", 0, 4000)) == b"\x00" * 4000  # mapped again
        monkeypatch.setattr(LocalStorage, "_MAPS_BYTES", 1000)
        assert bytes(storage.map("m/3")) == b"\x03" * 4000 and list(storage._maps) == ["m/3"]

    def test_pickled_copy_starts_without_maps(self, storage: LocalStorage) -> None:
        storage.write("p/x", b"abc")
        storage.map("p/x")
        copy = pickle.loads(pickle.dumps(storage))
        assert copy.root == storage.root and "_maps" not in copy.__dict__
        assert bytes(copy.map("p/x")) == b"abc"


@pytest.mark.s3
class TestS3Storage(StorageTests):
    machine_examples = 15

    @pytest.fixture
    def new_storage(self, s3_bucket: str) -> Callable[[], Storage]:
        return lambda: open_storage(f"{s3_bucket}/{uuid.uuid4().hex[:8]}/root")

    @pytest.fixture
    def other(self, storage: Storage) -> Storage:
        # fsspec caches file-system instances; a truly second client has its own listings cache.
        o = FsspecStorage(storage.uri, {"skip_instance_cache": True})
        assert o.fs is not storage.fs
        return o

    def test_open_storage_picks_fsspec(self, storage: Storage) -> None:
        assert isinstance(storage, FsspecStorage)
        assert storage.uri.startswith("s3://")

    def test_write_single_memoryview(self, storage: Storage) -> None:
        super().test_write_single_memoryview(storage)

    def test_read_range_empty(self, storage: Storage) -> None:
        super().test_read_range_empty(storage)
