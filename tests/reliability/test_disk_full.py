"""The journal's filesystem fills up: the receiver answers 503 (senders retry), nothing acknowledged is lost,
deliveries already under way are recorded once space returns, and the relay carries on by itself.

The filesystem is a real one: a small tmpfs the test mounts (as root; skipped with the reason otherwise),
holding only the state directory, filled up with a file that is deleted to give the space back.
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fault_proxy import fault_proxy, s3_error
from tests.helpers import (
    RelayProcess,
    config_dict,
    destination_row,
    free_port,
    journal_db,
    wait_until_sync,
    write_config,
)
from tests.moto_s3 import MotoS3
from tests.reliability.leaks import ENV, Leaks
from tests.reliability.pusher import Pusher, numbered

BATCH = 50


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 6 MiB tmpfs, unmounted at the end whatever happens."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI as a normal user skips this test)")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m,mode=0700", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(path: Path) -> int:
    """Write zeros to `path` until the filesystem says it is full; returns the bytes written."""
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        chunk = b"\0" * 65536
        while True:
            try:
                written += os.write(fd, chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                if len(chunk) == 1:
                    return written
                chunk = chunk[: len(chunk) // 16]
    finally:
        os.close(fd)


def test_full_disk_answers_503_keeps_everything_acknowledged_and_recovers(
        tmp_path: Path, small_disk: Path, moto: MotoS3, leaks: Leaks) -> None:
    """S3 holds the first uploads without an answer while entries come in and the disk fills; then it cuts
    them and answers 503 (the destination turns "retrying" on a full disk: that must not stop the retries),
    then takes the uploads: their outcome cannot be recorded until space returns, and must wait for it
    rather than take the relay down."""
    leaks.secret(moto.relay.secret)
    port = free_port()
    bucket = moto.new_bucket()
    busy = s3_error(503, "Slow Down", "SlowDown", "Please reduce your request rate.")
    with fault_proxy(("127.0.0.1", moto.port), mode="stall", fail_count=10**9, fail_response=busy) as proxy:
        config = write_config(tmp_path / "relay.yaml", config_dict(
            tmp_path, {"push": {"type": "http", "listen": f"127.0.0.1:{port}",
                                "auth": {"bearer_tokens": ["${RECEIVER_TOKEN}"]}}},
            {"archive": {"type": "s3", "bucket": bucket, "endpoint_url": proxy.url, "region": "us-east-1",
                         "access_key_id": "${S3_KEY_ID}", "secret_access_key": "${S3_SECRET}",
                         "batch": {"max_entries": 100, "max_wait": "20ms"}, "concurrency": 4,
                         "retry": {"initial_backoff": "50ms", "max_backoff": "300ms"}}},
            state_dir=str(small_disk / "state")))
        env = {**ENV, "S3_KEY_ID": moto.relay.id, "S3_SECRET": moto.relay.secret}
        relay = RelayProcess(config, leaks.file("relay log", tmp_path / "relay.log"), env=env)
        pusher = Pusher(f"http://127.0.0.1:{port}/v1/entries")
        batches = [[numbered("disk", b * BATCH + i, context={"pad": "x" * 400}) for i in range(BATCH)]
                   for b in range(400)]
        refused: list[list[dict[str, object]]] = []
        state = small_disk / "state"
        try:
            relay.start()
            for batch in batches[:10]:
                assert pusher.push(batch) == 200
            wait_until_sync(lambda: proxy.count("PUT") >= 4, 30, "S3 to hold a few uploads")
            filler = small_disk / "filler"
            fill(filler)
            sent = 10
            for batch in batches[10:]:  # until the journal needs space the disk does not have
                sent += 1
                status = pusher.push(batch)
                assert status in (200, 503), f"answered {status}"
                if status == 503:
                    refused.append(batch)
                    break
            assert refused, "the journal never ran out of space"
            for batch in batches[sent:sent + 10]:  # still full: refused, and the relay is still there
                assert pusher.push(batch) == 503
                refused.append(batch)

            proxy.mode = "fail"  # the held uploads fail now, on a full disk, and are retried into 503s
            proxy.refuse()
            proxy.resume()
            wait_until_sync(lambda: sum(seen.outcome == "fail" for seen in proxy.seen) >= 8, 30,
                            "uploads retried while the disk is full")
            proxy.mode = "forward"  # S3 takes the uploads; recording them needs space there is not
            try:
                wait_until_sync(lambda: len(moto.objects(bucket)) >= 2, 30, "uploads while the disk is full")
            except AssertionError as exc:  # keep what would explain it (CI saw this when retries stopped)
                with journal_db(state) as db:
                    pending = db.execute("SELECT first_seq, last_seq, done FROM pending").fetchall()
                raise AssertionError(
                    f"{exc}: {len(moto.objects(bucket))} objects in S3, {proxy.count('PUT')} PUTs seen by the "
                    f"proxy, batches recorded {pending}, the relay's last events: {relay.events()[-30:]}") from None
            assert pusher.push(batches[sent + 10]) == 503, "still refusing: the disk is still full"
            refused.append(batches[sent + 10])
            assert relay.proc is not None and relay.proc.poll() is None, "the relay is still running"
            assert pusher.client.get(f"http://127.0.0.1:{port}/healthz").status_code == 503
            assert destination_row(state, "archive")["offset"] == 0, "nothing could be recorded yet"

            filler.unlink()
            for batch in refused + batches[sent + 11:sent + 30]:
                pusher.push_until_acked(batch)

            def in_s3() -> Counter[str]:
                return Counter(json.loads(line)["id"] for body in moto.objects(bucket).values()
                               for line in gzip.decompress(body).splitlines())

            wait_until_sync(lambda: pusher.acked <= set(in_s3()), 60, "every acknowledged entry in S3")
            assert relay.terminate() == 0
        finally:
            relay.stop_quietly()
            pusher.close()
    copies = in_s3()
    assert max(copies.values()) == 1, "an entry is in two objects"
    events = [e.get("event") for e in relay.events()]
    assert "journal_disk_full" in events and "journal_disk_space_returned" in events
    assert "http_unavailable" in events
    with journal_db(state) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        journaled = {json.loads(row[0])["id"] for row in db.execute("SELECT data FROM entries")}
    assert pusher.acked <= journaled
    print(f"\ndisk full: {len(pusher.acked)} entries acknowledged, {len(refused)} requests answered 503 while "
          f"full, answers {dict(pusher.answers)}")
