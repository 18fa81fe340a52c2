"""storage.py's obstore path without a server (obstore's in-memory store stands in for S3), its errors as the
built-in ones retries understand, the credentials and store it builds from s3fs's options, and a Location
across processes. (Against a real S3 server: tests/test_s3.py, tests/test_safety_s3.py.)"""

import asyncio
import json
import pickle

import obstore
import pytest
from obstore.exceptions import GenericError, NotFoundError, PermissionDeniedError, UnauthenticatedError
from obstore.store import MemoryStore

from unclip_batch import storage
from unclip_batch.storage import Location


def test_every_object_is_put_with_its_content_type_and_the_stored_ones_leave_pending():
    store = MemoryStore()
    pending = {f"images/r{i}/0.png": bytes([i]) * 10 for i in range(40)} | {"metadata/00000.parquet": b"PAR1"}
    storage._put_all(store, pending)
    assert pending == {}
    assert obstore.get(store, "images/r7/0.png").bytes() == bytes([7]) * 10
    assert obstore.get(store, "images/r7/0.png").attributes["Content-Type"] == "image/png"
    assert "Content-Type" not in obstore.get(store, "metadata/00000.parquet").attributes  # no type known


def test_failed_puts_stay_pending_and_the_first_is_raised_as_a_builtin_error(monkeypatch):
    store = MemoryStore()
    real = obstore.put_async

    async def put_async(store, key, data, **kwargs):
        if key.startswith("bad"):
            raise GenericError(f"connection reset for {key}\ndebug: a long dump")
        return await real(store, key, data, **kwargs)

    monkeypatch.setattr(obstore, "put_async", put_async)
    pending = {"bad/0.png": b"0", "good.png": b"1", "bad/1.png": b"2"}
    with pytest.raises(OSError, match="^2 of 3 PUTs failed, first: connection reset for bad/0.png$"):
        storage._put_all(store, pending)
    assert sorted(pending) == ["bad/0.png", "bad/1.png"]  # a retry sends only these
    assert obstore.get(store, "good.png").bytes() == b"1"


def test_puts_run_inside_a_running_event_loop_too():
    async def in_a_notebook():
        store, pending = MemoryStore(), {"a.png": b"a"}
        storage._put_all(store, pending)
        return pending, obstore.get(store, "a.png").bytes()

    assert asyncio.run(in_a_notebook()) == ({}, b"a")
    assert storage._run_async(lambda: asyncio.sleep(0, result=5)) == 5


@pytest.mark.parametrize(
    "error, kind",
    [
        (PermissionDeniedError("denied\nmore"), PermissionError),
        (UnauthenticatedError("who are you"), PermissionError),
        (PermissionError("local"), PermissionError),
        (NotFoundError("no such bucket"), FileNotFoundError),
        (FileNotFoundError("gone"), FileNotFoundError),
        (GenericError("timeout"), OSError),
    ],
)
def test_obstore_errors_become_the_builtin_ones_retries_understand(error, kind):
    converted = storage._builtin(error, "while putting: ")
    assert type(converted) is kind
    first_line = str(error).split("\n")[0]
    assert str(converted) == (first_line if kind is not OSError else f"while putting: {first_line}")
    assert storage.permanent(converted) == (kind is not OSError)


def test_a_bulk_delete_removes_by_key_and_raises_as_a_builtin(monkeypatch):
    store = MemoryStore()
    for key in ("a.png", "b.png", "c.png"):
        obstore.put(store, key, b"x")
    storage._delete_all(store, ["a.png", "c.png"])
    assert [o["path"] for batch in obstore.list(store) for o in batch] == ["b.png"]

    def refuses(store, keys):
        raise PermissionDeniedError("no s3:DeleteObject")

    monkeypatch.setattr(obstore, "delete", refuses)
    with pytest.raises(PermissionError, match="no s3:DeleteObject"):
        storage._delete_all(store, ["b.png"])


def test_credentials_come_from_the_options_or_botocores_chain(monkeypatch):
    given = storage._Credentials({"key": "AKIA", "secret": "s3cret", "token": "t"})()
    assert given == {"access_key_id": "AKIA", "secret_access_key": "s3cret", "token": "t", "expires_at": None}
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "from-env")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    chained = storage._Credentials({})()
    assert (chained["access_key_id"], chained["secret_access_key"], chained["token"]) == (
        "from-env",
        "env-secret",
        None,
    )


def test_the_s3_store_takes_endpoint_region_and_credentials_as_s3fs_does(monkeypatch):
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    options = {
        "key": "k",
        "secret": "s",
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:1", "region_name": "eu-west-3"},
    }
    store = storage._s3_store(json.dumps(options), "bucket-a")
    assert store.config == {"endpoint": "http://127.0.0.1:1", "region": "eu-west-3", "bucket": "bucket-a"}
    assert store.client_options == {"allow_http": "true"}
    # An endpoint named without a region: botocore signs with us-east-1, and so does the store.
    plain = storage._s3_store(json.dumps({"key": "k", "secret": "s", "endpoint_url": "http://127.0.0.1:2"}), "b")
    assert plain.config == {"endpoint": "http://127.0.0.1:2", "region": "us-east-1", "bucket": "b"}
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:3")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "ap-south-1")
    from_env = storage._s3_store(json.dumps({"anon": True}), "c")
    assert from_env.config == {
        "endpoint": "http://127.0.0.1:3",
        "region": "ap-south-1",
        "bucket": "c",
        "skip_signature": "true",
    }
    assert storage._bucket_region({}, "b", "http://127.0.0.1:1") == "us-east-1"


def test_no_store_without_credentials_or_a_region_and_s3fs_writes_instead(monkeypatch, caplog):
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    assert storage._s3_store(json.dumps({"endpoint_url": "http://127.0.0.1:4"}), "d") is None  # no credentials

    class Unreachable:
        def __init__(self, **options):
            pass

        def call_s3(self, *args, **kwargs):
            raise OSError("no route to AWS")

    import s3fs

    monkeypatch.setattr(s3fs, "S3FileSystem", Unreachable)
    with caplog.at_level("INFO", logger="unclip_batch.storage"):
        assert storage._bucket_region({"key": "k"}, "e", None) is None
        assert storage._s3_store(json.dumps({"key": "k", "secret": "s"}), "e") is None
    assert "region of bucket e not found (no route to AWS); writing through s3fs" in caplog.text

    class Answers(Unreachable):
        def call_s3(self, method, Bucket):
            assert (method, Bucket) == ("head_bucket", "f")
            return {"ResponseMetadata": {"HTTPHeaders": {"x-amz-bucket-region": "sa-east-1"}}}

    monkeypatch.setattr(s3fs, "S3FileSystem", Answers)
    assert storage._bucket_region({"key": "k"}, "f", None) == "sa-east-1"


def test_a_location_crosses_processes_with_its_options_and_compares_by_url():
    options = {"key": "k", "secret": "s3cret", "client_kwargs": {"endpoint_url": "http://h:1"}}
    location = Location("s3://bucket/out", options)
    copy = pickle.loads(pickle.dumps(location))
    assert copy.url == "s3://bucket/out" and copy.root == "bucket/out" and copy.family == "s3"
    assert copy.fs.storage_options == options  # the options came along, and build its filesystem
    assert copy == location and hash(copy) == hash(location) and copy != Location("s3://bucket/other", options)
    assert Location("s3://bucket/out") != location  # the same place reached with other options is another
    assert location != "s3://bucket/out" and len({location, copy}) == 1
    assert "s3cret" not in repr(location) and "s3cret" not in str(location)


def test_s3_objects_go_through_obstore_where_the_options_allow_and_through_s3fs_otherwise(monkeypatch):
    """write_many, read_whole and remove_files on an s3fs filesystem: the obstore store of the path's bucket
    (an in-memory one stands in, built from the filesystem's options), each object under its key."""
    import s3fs

    stores, built = {}, []

    def s3_store(options: str, bucket: str):
        built.append((json.loads(options), bucket))
        return stores.setdefault(bucket, MemoryStore())

    monkeypatch.setattr(storage, "_s3_store", s3_store)
    retried, retrying = [], storage.retrying

    def spy(action, what, retry_for_s=storage.RETRY_FOR_S):
        retried.append((what, retry_for_s))
        return retrying(action, what, retry_for_s)

    monkeypatch.setattr(storage, "retrying", spy)
    options = {"key": "k", "secret": "s", "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}}
    output = Location("s3://bucket-a/run", options)
    output.write_many({"images/r1/0.png": b"png", "metadata/00000.parquet": b"PAR1"}, retry_for_s=5)
    output.write("_SUCCESS", b"{}", retry_for_s=5)
    assert built[0] == (options, "bucket-a") and set(stores) == {"bucket-a"}
    stored = sorted(o["path"] for batch in obstore.list(stores["bucket-a"]) for o in batch)
    assert stored == ["run/_SUCCESS", "run/images/r1/0.png", "run/metadata/00000.parquet"]
    assert output.read("images", "r1", "0.png") == b"png"
    with pytest.raises(FileNotFoundError):
        output.read("images", "r2", "0.png")
    output.remove_files(["images/r1/0.png", "images/r9/0.png"], retry_for_s=5)  # one there, one not
    stored = sorted(o["path"] for batch in obstore.list(stores["bucket-a"]) for o in batch)
    assert stored == ["run/_SUCCESS", "run/metadata/00000.parquet"]
    assert retried == [
        ("writing 2 objects under bucket-a/run", 5),
        ("writing 1 objects under bucket-a/run", 5),
        ("removing 2 files under bucket-a/run/images/r1", 5),
    ]
    # Options obstore would not honour the same way (an ACL, say) keep every call on s3fs.
    assert storage.s3_store(s3fs.S3FileSystem(**options, s3_additional_kwargs={"ACL": "private"}), "b") is None
    odd_client = {**options, "client_kwargs": {"endpoint_url": "http://127.0.0.1:9", "verify": False}}
    assert storage.s3_store(s3fs.S3FileSystem(**odd_client), "b") is None
    assert storage.s3_store(fsspec_memory(), "b") is None  # not S3 at all
    assert storage.s3_store(s3fs.S3FileSystem(**options), "bucket-b") is stores.setdefault("bucket-b", MemoryStore())


def fsspec_memory():
    import fsspec

    return fsspec.filesystem("memory")


def test_requests_malformed_before_sending_or_without_credentials_are_not_retried():
    """Errors no retry can fix, known by their class names (botocore, requests and aiohttp are not imported
    for this): the call fails at once instead of spending the retry window."""

    def kind(name: str, base=Exception):
        return type(name, (base,), {})

    for name in ("ParamValidationError", "InvalidURL", "NoCredentialsError"):
        assert storage.permanent(kind(name)("x")), name
        assert storage.permanent(kind("Subclass", kind(name))("x")), name  # any class above it counts
    assert not storage.permanent(kind("ReadTimeoutError")("x"))
    calls = []

    def fails():
        calls.append(1)
        raise kind("NoCredentialsError")("Unable to locate credentials")

    with pytest.raises(Exception, match="Unable to locate credentials"):
        storage.retrying(fails, "writing", retry_for_s=60)
    assert calls == [1]


def test_renewable_credentials_are_asked_again_within_minutes_and_fixed_ones_never():
    import datetime as dt
    from types import SimpleNamespace

    frozen = SimpleNamespace(access_key="a", secret_key="s", token="t")

    class Renewable:  # botocore's RefreshableCredentials: an assumed role, an instance profile
        refresh_needed = True

        def get_frozen_credentials(self):
            return frozen

    provider = storage._Credentials({"key": "k", "secret": "s"})
    provider.credentials = Renewable()
    before = dt.datetime.now(dt.UTC)
    answer = provider()
    assert (answer["access_key_id"], answer["secret_access_key"], answer["token"]) == ("a", "s", "t")
    assert (
        before + storage._Credentials.RECHECK
        <= answer["expires_at"]
        <= dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5)
    )
    assert storage._Credentials.RECHECK == dt.timedelta(minutes=5)


def test_the_names_at_a_roots_top_from_a_store_that_lists_folders_with_a_slash():
    """Some stores (gcsfs, a folder marker on S3) list a folder as ``name/``: it is still ``name``."""
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    class Slashed(MemoryFileSystem):
        protocol = "slashed"
        store, pseudo_dirs = {}, [""]

        def ls(self, path, detail=False, **kwargs):
            names = super().ls(path, detail=False, **kwargs)
            return [f"{p}/" if self.isdir(p) else p for p in names]

    fsspec.register_implementation("slashed", Slashed, clobber=True)  # a protocol of this test's own
    location = Location("slashed://bucket/out")
    location.write("_job.json", b"{}")
    location.write("images/r0/0.png", b"png")
    assert [p.rsplit("/out/", 1)[1] for p in location.fs.ls(location.root)] == ["_job.json", "images/"]
    assert location.top() == ["_job.json", "images"]


def test_a_source_path_resolves_against_its_manifests_folder_unless_it_is_absolute():
    assert storage.resolve("img/a.png", "s3://b/in/") == "s3://b/in/img/a.png"
    assert storage.resolve("img/a.png", "/data/in") == "/data/in/img/a.png"
    assert storage.resolve("/elsewhere/a.png", "/data/in") == "/elsewhere/a.png"
    assert storage.resolve("https://h/a.png", "s3://b/in") == "https://h/a.png"


def test_credentials_of_a_named_profile(tmp_path, monkeypatch):
    (tmp_path / "credentials").write_text(
        "[default]\naws_access_key_id = DEFAULT\naws_secret_access_key = d\n"
        "[render]\naws_access_key_id = RENDER\naws_secret_access_key = r\n"
    )
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    assert storage._Credentials({"profile": "render"})()["access_key_id"] == "RENDER"
    assert storage._Credentials({})()["access_key_id"] == "DEFAULT"


def test_which_urls_are_local_paths_and_which_store_family_a_url_names():
    cases = {"/data/in/a.png": "/data/in/a.png", "file:///data/a.png": "/data/a.png", "s3://b/a.png": None}
    cases |= {"https://h.example/a.png": None, "memory://x/a.png": None, "in/a.png": "in/a.png"}
    assert {url: storage.local_path(url) for url in cases} == cases
    families = {"s3a://b/k": "s3", "gcs://b/k": "gs", "abfss://c/k": "az", "/p": "file", "file:///p": "file"}
    families |= {"memory://x": "memory", "webhdfs://h/p": "webhdfs"}  # any other protocol: a family of its own
    assert {url: storage.family(url) for url in families} == families


def test_files_named_with_glob_characters_are_removed_by_name_and_nothing_they_would_match():
    import uuid

    import fsspec

    fs, root = fsspec.filesystem("memory"), f"/rm-{uuid.uuid4().hex}"
    for name in ("run[1]/a.png", "run1/a.png", "run*/b.png", "runX/b.png", "plain/c.png"):
        fs.pipe_file(f"{root}/{name}", b"x")
    storage._rm_files(fs, [f"{root}/run[1]/a.png", f"{root}/run*/b.png", f"{root}/gone.png"])
    storage._rm_files(fs, [f"{root}/plain/c.png", f"{root}/plain/gone.png"])  # no pattern: one bulk call
    assert sorted(fs.find(root)) == [f"{root}/run1/a.png", f"{root}/runX/b.png"]


def test_files_below_a_folder_leave_out_the_folders_own_object():
    """SeaweedFS lists an emptied folder as an object named like the folder (``out/images/``)."""
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    class Marked(MemoryFileSystem):
        protocol = "marked"
        store, pseudo_dirs = {}, [""]

        def find(self, path, **kwargs):
            return [f"{path.rstrip('/')}/", *super().find(path, **kwargs)]

    fsspec.register_implementation("marked", Marked, clobber=True)  # a protocol of this test's own
    location = Location("marked://bucket/out")
    location.write("images/r0/0.png", b"png")
    location.write("images/r1/0.png", b"png")
    assert location.files("images") == ["images/r0/0.png", "images/r1/0.png"]
    location.remove("images")
    assert location.files("images") == [] and location.files() == []


@pytest.mark.parametrize("path", ["/data/run", "/data", "/data/other/x", "/data/run/../x", "/elsewhere"])
def test_only_a_path_below_the_root_is_relative_to_it(path):
    location = Location("/data/run")
    assert location.relative("/data/run/a/b.png") == "a/b.png"
    with pytest.raises(ValueError, match="is not below"):
        location.relative(path)
