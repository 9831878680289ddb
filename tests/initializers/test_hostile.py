"""The initializers against broken and hostile servers and file trees: no forged completion, no secret sent
elsewhere or printed, no hang, bounded listings, one line (never a traceback) for bad data."""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from pkg.initializers.config import Tuning, load_tuning
from pkg.initializers.errors import InitializerError
from pkg.initializers.listing import Listing
from pkg.initializers.uri import parse_uri
from tests.initializers.conftest import HUB_TOKEN, Runner, one_error_line, tree
from tests.support.fault_proxy import FaultProxy, FaultRule
from tests.support.hostile_server import (
    COMMIT,
    Answer,
    HostileServer,
    Responder,
    Seen,
    endless_s3,
    gzip_bomb,
    hub_answers,
    json_answer,
    s3_answers,
    s3_listing,
    tree_entries,
)
from tests.support.hub_server import HubServer

FILES = {"config.json": b'{"a": 1}', "data/train.jsonl": b'{"text": "x"}\n' * 10}


@pytest.fixture
def serve() -> Iterator[Callable[[Responder], HostileServer]]:
    servers: list[HostileServer] = []

    def start(respond: Responder) -> HostileServer:
        servers.append(HostileServer(respond).start())
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def hub_env(server: HostileServer, out: Path, **extra: str) -> dict[str, str]:
    return {
        "HF_ENDPOINT": server.endpoint,
        "STORAGE_URI": "hf://org/name",
        "OUTPUT_PATH": str(out),
        "INIT_MAX_ATTEMPTS": "1",
        **extra,
    }


def s3_env(server: HostileServer, out: Path, uri: str = "s3://bucket/p", **extra: str) -> dict[str, str]:
    return {
        "ENDPOINT": server.endpoint,
        "ACCESS_KEY_ID": "AKIAHOSTILETEST00000",
        "SECRET_ACCESS_KEY": "HostileTestSecretKey0000000000000000000",
        "REGION": "us-east-1",
        "STORAGE_URI": uri,
        "OUTPUT_PATH": str(out),
        "INIT_MAX_ATTEMPTS": "1",
        **extra,
    }


def failed(result: object, *expected: str) -> str:
    """Assert a run failed with exit 1 and one error line holding every `expected` text; return the line."""
    assert result.returncode == 1, (result.stdout, result.stderr)  # type: ignore[attr-defined]
    line = one_error_line(result.stderr)  # type: ignore[attr-defined]
    for text in expected:
        assert text in line, line
    return line


# -- 1. forged completion ------------------------------------------------------------------------------------
def test_hub_repo_cannot_forge_the_completion_marker(
    run: Runner, hub: HubServer, hub_proxy: FaultProxy, tmp_path: Path
) -> None:
    """A repo holding `.initializer/manifest.json` that claims this very request complete, plus weights whose
    GET fails: the first run fails, and the retry must download the weights, not say "already complete"."""
    out = tmp_path / "out"
    request = {"kind": "model", "storage_uri": "hf://org/forger", "hf_endpoint": hub_proxy.endpoint}
    forged = {"format": 1, "request": request, "total_files": 0, "total_bytes": 0, "files": []}
    weights = os.urandom(3000)
    hub.add_repo(
        "org/forger",
        {
            "config.json": b"{}",
            "model.safetensors": weights,
            ".initializer/manifest.json": json.dumps(forged).encode(),
            ".initializer/journal.jsonl": b'{"path": "model.safetensors"}\n',
            ".initializer/lock": b"",
        },
    )
    env = {"HF_ENDPOINT": hub_proxy.endpoint, "STORAGE_URI": "hf://org/forger", "OUTPUT_PATH": str(out)}
    hub_proxy.add(FaultRule(status=404, times=100, match="model.safetensors"))
    first = run("model", **env)
    assert first.returncode == 1
    assert "skipping 3 files under .initializer/" in first.stdout
    hub_proxy.clear()
    second = run("model", **env)
    assert second.returncode == 0, second.stderr
    assert "already complete in" not in second.stdout
    assert tree(out) == {"config.json": b"{}", "model.safetensors": weights}
    marker = json.loads((out / ".initializer/manifest.json").read_text())
    assert sorted(f["path"] for f in marker["files"]) == ["config.json", "model.safetensors"]


def test_copying_a_filled_output_folder_skips_its_state(run: Runner, tmp_path: Path) -> None:
    """file:///old-output: the old run's marker is not copied over this run's state."""
    src, old, new = tmp_path / "src", tmp_path / "old", tmp_path / "new"
    src.mkdir()
    (src / "a.txt").write_bytes(b"a")
    assert run("dataset", STORAGE_URI=f"file://{src}", OUTPUT_PATH=str(old)).returncode == 0
    result = run("dataset", STORAGE_URI=f"file://{old}", OUTPUT_PATH=str(new))
    assert result.returncode == 0, result.stderr
    assert "skipping 2 files under .initializer/" in result.stdout  # the marker and the lock
    assert tree(new) == {"a.txt": b"a"}
    marker = json.loads((new / ".initializer/manifest.json").read_text())
    assert marker["request"]["storage_uri"] == f"file://{old}"


def test_s3_keys_under_initializer_are_skipped(
    run: Runner, serve: Callable[[Responder], HostileServer], tmp_path: Path
) -> None:
    server = serve(
        s3_answers({"p/a": b"aaa", "p/.initializer/manifest.json": b"{}", "p/.initializer/lock": b""})
    )
    result = run("dataset", **s3_env(server, tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert "skipping 2 files under .initializer/" in result.stdout
    assert tree(tmp_path / "out") == {"a": b"aaa"}
    assert not any(".initializer" in p for p in server.paths() if "list-type" not in p)


# -- 2. the state folder -------------------------------------------------------------------------------------
@pytest.mark.parametrize("what", [".initializer", ".initializer/journal.jsonl"])
def test_symlinked_state_folder_is_refused(run: Runner, tmp_path: Path, what: str) -> None:
    src, out, elsewhere = tmp_path / "src", tmp_path / "out", tmp_path / "elsewhere"
    src.mkdir()
    (src / "a.txt").write_bytes(b"a")
    elsewhere.mkdir()
    (out / ".initializer").mkdir(parents=True)
    link = out / what
    if link.is_dir():
        link.rmdir()
    link.symlink_to(elsewhere / "target" if what.endswith(".jsonl") else elsewhere)
    result = run("dataset", STORAGE_URI=f"file://{src}", OUTPUT_PATH=str(out))
    failed(result, "a symlink", "remove it")
    assert list(elsewhere.iterdir()) == []  # no lock, journal or marker landed there


# -- 3. file:// symlinks -------------------------------------------------------------------------------------
def test_local_symlinks_out_of_the_source_are_skipped(run: Runner, tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    (src / "sub").mkdir(parents=True)
    secret = tmp_path / "token"
    secret.write_bytes(b"service-account-token")
    (src / "ok.txt").write_bytes(b"ok")
    (src / "innocent.txt").symlink_to(secret)
    (src / "sub" / "sneaky").symlink_to("../../token")
    (src / "inside").symlink_to(src / "ok.txt")  # stays in the source: copied as its content
    result = run("dataset", STORAGE_URI=f"file://{src}", OUTPUT_PATH=str(out))
    assert result.returncode == 0, result.stderr
    assert "skipping 2 symlinks that point outside" in result.stdout
    assert tree(out) == {"ok.txt": b"ok", "inside": b"ok"}


# -- 4. secrets ----------------------------------------------------------------------------------------------
def test_hub_next_page_on_another_host_gets_no_token(
    run: Runner, serve: Callable[[Responder], HostileServer], tmp_path: Path
) -> None:
    evil = serve(lambda seen: json_answer([]))
    link = f'<{evil.endpoint}/api/models/org/name/tree/{COMMIT}?recursive=true&cursor=2>; rel="next"'
    hub = serve(hub_answers(FILES, tree=lambda seen: json_answer(tree_entries(FILES), {"Link": link})))
    result = run("model", **hub_env(hub, tmp_path / "out", ACCESS_TOKEN=HUB_TOKEN))
    failed(result, "another host", "the Hub at")
    assert not [s for s in evil.seen if "Authorization" in s.headers]
    assert HUB_TOKEN not in result.stdout + result.stderr


def test_s3_redirect_to_another_host_drops_the_signature(
    run: Runner, serve: Callable[[Responder], HostileServer], tmp_path: Path
) -> None:
    evil = serve(lambda seen: Answer(200, b"hello"))
    objects = s3_answers({"p/a": b"hello"})

    def respond(seen: Seen) -> Answer:
        if "list-type" in seen.query:
            return objects(seen)
        return Answer(307, b"", {"Location": f"{evil.endpoint}/elsewhere/a"})

    server = serve(respond)
    env = s3_env(server, tmp_path / "out")
    del env["ACCESS_KEY_ID"], env["SECRET_ACCESS_KEY"]
    token = "FwoGZXIvYXdzEHostileSessionToken0123456789abcdefghijklmnopqrstuvwxyz"
    creds = {"AWS_ACCESS_KEY_ID": "ASIAHOSTILE000000000", "AWS_SECRET_ACCESS_KEY": "s" * 40}
    result = run("dataset", **env, **creds, AWS_SESSION_TOKEN=token)
    assert result.returncode == 0, result.stderr
    assert evil.seen, "the redirect was not followed"
    for seen in evil.seen:
        names = {k.lower(): v for k, v in seen.headers.items()}
        assert "authorization" not in names and "x-amz-security-token" not in names
        assert names["host"] == urlsplit(evil.endpoint).netloc  # not the first host's, signed Host
    assert token not in result.stdout + result.stderr


def test_credentials_from_the_default_chain_are_redacted(
    run: Runner, serve: Callable[[Responder], HostileServer], tmp_path: Path
) -> None:
    """Keys from a container credentials endpoint (as EKS Pod Identity / ECS give them), echoed back by the
    server in an error, whole and cut short: none of it is printed."""
    token = "IQoJb3JpZ2luX2VjEContainerSessionToken" + "Z" * 60
    secret = "ContainerSecretAccessKey/abcdefghij0123456"
    creds = serve(
        lambda seen: json_answer(
            {
                "AccessKeyId": "ASIACONTAINER0000000",
                "SecretAccessKey": secret,
                "Token": token,
                "Expiration": "2099-01-01T00:00:00Z",
            }
        )
    )
    body = (
        f"<Error><Code>InvalidArgument</Code><Message>token {token[:30]} secret {secret} "
        f"again {token}</Message></Error>"
    )
    server = serve(lambda seen: Answer(400, body.encode(), {"Content-Type": "application/xml"}))
    env = s3_env(server, tmp_path / "out", AWS_CONTAINER_CREDENTIALS_FULL_URI=f"{creds.endpoint}/creds")
    del env["ACCESS_KEY_ID"], env["SECRET_ACCESS_KEY"]
    result = run("dataset", **env)
    failed(result, "InvalidArgument")
    printed = result.stdout + result.stderr
    assert token[:20] not in printed and secret[:20] not in printed


def test_hf_endpoint_login_is_never_stored_or_printed(
    run: Runner, serve: Callable[[Responder], HostileServer], tmp_path: Path
) -> None:
    password = "MirrorPassw0rdThatMustStaySecret"
    hub = serve(hub_answers(FILES))
    login_endpoint = hub.endpoint.replace("http://", f"http://mirror-user:{password}@")
    out = tmp_path / "out"
    result = run("dataset", **hub_env(hub, out, HF_ENDPOINT=login_endpoint))
    assert result.returncode == 0, result.stderr
    assert tree(out) == FILES
    marker = (out / ".initializer/manifest.json").read_text()
    assert password not in marker and "mirror-user" not in marker
    assert json.loads(marker)["request"]["hf_endpoint"] == hub.endpoint
    assert password not in result.stdout + result.stderr
    assert all(s.headers.get("Authorization", "").startswith("Basic ") for s in hub.seen)


def test_part_of_a_token_echoed_by_the_hub_is_redacted(
    run: Runner, serve: Callable[[Responder], HostileServer], tmp_path: Path
) -> None:
    echo = f"bad token {HUB_TOKEN[:30]}".encode()
    hub = serve(hub_answers(FILES, info=lambda seen: Answer(400, echo, {"X-Error-Message": echo.decode()})))
    result = run("model", **hub_env(hub, tmp_path / "out", ACCESS_TOKEN=HUB_TOKEN))
    line = failed(result, "bad token ***")
    assert HUB_TOKEN[:14] not in line


# -- 5. hangs and loops --------------------------------------------------------------------------------------
def test_silent_hub_api_times_out(
    run: Runner, serve: Callable[[Responder], HostileServer], tmp_path: Path
) -> None:
    hub = serve(hub_answers(FILES, info=lambda seen: Answer(hang=120)))
    result = run("model", timeout=60, **hub_env(hub, tmp_path / "out", INIT_READ_TIMEOUT="1"))
    failed(result, "still failing after 1 attempts", "timed out")


def test_trickling_tree_page_times_out(
    run: Runner, serve: Callable[[Responder], HostileServer], tmp_path: Path
) -> None:
    """A byte every 0.3 s never trips a 1 s read timeout; the deadline of 4 INIT_READ_TIMEOUTs does."""
    trickle = Answer(200, (b" " for _ in itertools.count()), {"Content-Type": "application/json"}, pause=0.3)
    hub = serve(hub_answers(FILES, tree=lambda seen: trickle))
    result = run("model", timeout=60, **hub_env(hub, tmp_path / "out", INIT_READ_TIMEOUT="1"))
    failed(result, "did not arrive in time")


def test_trickling_s3_listing_times_out(
    run: Runner, serve: Callable[[Responder], HostileServer], tmp_path: Path
) -> None:
    trickle = Answer(200, (b" " for _ in itertools.count()), {"Content-Type": "application/xml"}, pause=0.3)
    server = serve(lambda seen: trickle)
    result = run("dataset", timeout=60, **s3_env(server, tmp_path / "out", INIT_READ_TIMEOUT="1"))
    failed(result, "did not arrive in time")


def test_tree_link_to_the_same_page_stops(
    run: Runner, serve: Callable[[Responder], HostileServer], tmp_path: Path
) -> None:
    def same_page(seen: Seen) -> Answer:
        return json_answer(tree_entries(FILES), {"Link": f'<{hub.endpoint}{seen.path}>; rel="next"'})

    hub = serve(hub_answers(FILES, tree=same_page))
    result = run("model", timeout=60, **hub_env(hub, tmp_path / "out"))
    failed(result, "already read")
    assert len(hub.paths("/tree/")) == 1


@pytest.mark.parametrize(("fresh_keys", "message"), [(True, "INIT_MAX_FILES=2500"), (False, "twice")])
def test_endless_s3_listing_stops(
    run: Runner, serve: Callable[[Responder], HostileServer], tmp_path: Path, fresh_keys: bool, message: str
) -> None:
    """A fresh continuation token on every page, forever (botocore only stops a token seen twice)."""
    server = serve(endless_s3(fresh_keys))
    result = run("dataset", timeout=60, **s3_env(server, tmp_path / "out", INIT_MAX_FILES="2500"))
    failed(result, message)
    assert len(server.paths("list-type")) <= 3


def test_slow_endless_listing_stops_at_the_listing_deadline(
    run: Runner, serve: Callable[[Responder], HostileServer], tmp_path: Path
) -> None:
    endless = endless_s3(fresh_keys=True, per_page=1)
    server = serve(lambda seen: Answer(**{**endless(seen).__dict__, "hang": 0.2}))
    result = run("dataset", timeout=60, **s3_env(server, tmp_path / "out", INIT_LIST_TIMEOUT="2"))
    failed(result, "INIT_LIST_TIMEOUT=2s")


# -- 6. listing memory ---------------------------------------------------------------------------------------
def test_gzip_bomb_listing_is_refused(
    run: Runner, serve: Callable[[Responder], HostileServer], tmp_path: Path
) -> None:
    """About 1 MiB of gzip that inflates to 1 GiB: refused at the 64 MiB cap, not inflated."""
    bomb = Answer(200, gzip_bomb(1 << 30), {"Content-Type": "application/json", "Content-Encoding": "gzip"})
    hub = serve(hub_answers(FILES, tree=lambda seen: bomb))
    result = run("model", timeout=60, **hub_env(hub, tmp_path / "out"))
    failed(result, "larger than 64 MiB once decompressed")


def test_gzip_bomb_s3_listing_is_refused(
    run: Runner, serve: Callable[[Responder], HostileServer], tmp_path: Path
) -> None:
    bomb = Answer(200, gzip_bomb(1 << 30), {"Content-Type": "application/xml", "Content-Encoding": "gzip"})
    server = serve(lambda seen: bomb)
    result = run("dataset", timeout=60, **s3_env(server, tmp_path / "out"))
    failed(result, "larger than 64 MiB once decompressed")


def test_endless_tree_page_is_refused_at_the_cap(
    run: Runner, serve: Callable[[Responder], HostileServer], tmp_path: Path
) -> None:
    """One tree "page" of a million entries and more, without end: refused once it passes 64 MiB, never
    parsed (huggingface_hub reads it whole)."""
    entry = json.dumps(tree_entries({"x.txt": b"x"})[0]).encode() + b","

    def endless() -> Iterator[bytes]:
        yield b"["
        while True:
            yield entry * 1000

    hub = serve(
        hub_answers(FILES, tree=lambda seen: Answer(200, endless(), {"Content-Type": "application/json"}))
    )
    result = run("model", timeout=120, **hub_env(hub, tmp_path / "out"))
    failed(result, "larger than 64 MiB")


# -- 7. bad data: one line, never a traceback ----------------------------------------------------------------
def _entry(**fields: object) -> Responder:
    entry = {"type": "file", "oid": "a" * 40, "size": 3, "path": "x.txt", **fields}
    return lambda seen: json_answer([{k: v for k, v in entry.items() if v is not None}])


@pytest.mark.parametrize(
    ("tree_answer", "info_answer", "message"),
    [
        (
            None,
            lambda s: Answer(200, b"<html>Sign in to Wi-Fi</html>", {"Content-Type": "text/html"}),
            "not JSON",
        ),
        (None, lambda s: json_answer(["not", "a", "dict"]), "without a commit id"),
        (lambda s: json_answer({"files": []}), None, "not a list"),
        (_entry(size=None), None, "size of 'x.txt' is not an integer"),
        (_entry(size="3"), None, "size of 'x.txt' is not an integer"),
        (_entry(size=-3), None, "negative size"),
        (_entry(path=12), None, "not a string"),
        (_entry(oid=None), None, "without a git blob id"),
        (_entry(lfs={"size": 3}), None, "without a SHA-256"),
        (_entry(path="d/" + "n" * 300), None, "longer than 255 bytes"),
        (lambda s: json_answer([1]), None, "not an object"),
    ],
)
def test_malformed_hub_answers(
    run: Runner,
    serve: Callable[[Responder], HostileServer],
    tmp_path: Path,
    tree_answer: Responder | None,
    info_answer: Responder | None,
    message: str,
) -> None:
    hub = serve(hub_answers(FILES, tree=tree_answer, info=info_answer))
    failed(run("model", **hub_env(hub, tmp_path / "out")), message)


@pytest.mark.parametrize(
    ("objects", "message"),
    [
        ([("p/a", "abc")], "not an S3 answer"),  # botocore cannot parse the size
        ([(None, "3")], "not a string"),
        ([("p/a", "-3")], "negative size"),
        ([("other/a", "3")], "lies outside the folder asked for, 'p/'"),
    ],
)
def test_malformed_s3_listings(
    run: Runner,
    serve: Callable[[Responder], HostileServer],
    tmp_path: Path,
    objects: list[tuple[str | None, str]],
    message: str,
) -> None:
    server = serve(lambda seen: s3_listing(objects, prefix="p/"))
    failed(run("dataset", **s3_env(server, tmp_path / "out")), message)


@pytest.mark.fast
@pytest.mark.parametrize("key", ["a", "weights/model.safetensors"])
def test_listing_refuses_an_entry_listed_twice(key: str) -> None:
    """Names as a JSON answer gives them: a one-character name is one shared string object there."""
    first, again = json.loads(json.dumps([key, key]))
    listing = Listing("the server", Tuning())
    listing.add(first, 1, "v1")
    with pytest.raises(InitializerError, match=r"listed .* twice"):
        listing.add(again, 1, "v1")


@pytest.mark.fast
@pytest.mark.parametrize(
    ("name", "value"),
    [("INIT_READ_TIMEOUT", "nan"), ("INIT_READ_TIMEOUT", "inf"), ("INIT_PROGRESS_INTERVAL", "inf")],
)
def test_non_finite_settings_are_refused(name: str, value: str) -> None:
    with pytest.raises(InitializerError, match=f"{name}='{value}' must be a finite number"):
        load_tuning({name: value})


# -- 8. lower ------------------------------------------------------------------------------------------------
def test_hub_tree_503_gives_one_retry_layer(
    run: Runner, serve: Callable[[Responder], HostileServer], tmp_path: Path
) -> None:
    hub = serve(hub_answers(FILES, tree=lambda seen: Answer(503, b"busy")))
    result = run("model", **hub_env(hub, tmp_path / "out", INIT_MAX_ATTEMPTS="2"))
    failed(result, "still failing after 2 attempts", "HTTP 503")
    assert len(hub.paths("/tree/")) == 2


def test_control_characters_from_servers_are_escaped(
    run: Runner, serve: Callable[[Responder], HostileServer], tmp_path: Path
) -> None:
    body = b"oops\x1b[2J\rerror: forged\x07"
    hub = serve(hub_answers(FILES, info=lambda seen: Answer(400, body)))
    line = failed(run("model", **hub_env(hub, tmp_path / "out")), "oops\\x1b[2J\\x0derror: forged\\x07")
    assert "\x1b" not in line and "\r" not in line


@pytest.mark.fast
@pytest.mark.parametrize("uri", ["hf://org/name@%00", "hf://org/name@v1%0A", "hf://org/name@%2E%2E"])
def test_control_characters_in_a_revision_are_refused(uri: str) -> None:
    with pytest.raises(InitializerError, match="control characters"):
        parse_uri(uri)
