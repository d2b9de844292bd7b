"""Secrets: a relay whose credentials come through every channel (environment, `${file:}`, a systemd
credentials directory) and whose peers say the worst things back (revoked tokens, error pages that echo
the Authorization header, the API key or the signing secret), while its receiver gets requests with the
right, wrong and forged credentials: none of the values may appear in any log line, dead-letter or state
reason, metric, or the output of `relay status`, `dlq`, `check`.

The autouse `leaks` fixture does the scanning; this test makes sure there is plenty to scan.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import stat
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import trio

from tests.fakes.hec import FakeHec, Token, serve
from tests.fault_proxy import fault_proxy, http_answer, s3_error
from tests.helpers import (
    ROOT,
    RelayProcess,
    config_dict,
    dead_letters,
    destination_row,
    entry,
    free_ports,
    wait_until,
)
from tests.helpers import write_config as write_yaml
from tests.moto_s3 import MotoS3
from tests.reliability.leaks import (
    HEC_TOKEN,
    RECEIVER_SIGNING,
    RECEIVER_TOKEN,
    WEBHOOK_BASIC,
    WEBHOOK_BEARER,
    WEBHOOK_HEADER,
    WEBHOOK_PASSWORD,
    WEBHOOK_SIGNING,
    WEBHOOK_USER,
    Leaks,
)
from tests.webhook_receiver import Answer, start_receiver

FAST = {"retry": {"initial_backoff": "50ms", "max_backoff": "300ms"}, "batch": {"max_wait": "50ms"},
        "send_timeout": "3s"}


async def push_with_good_and_bad_credentials(url: str) -> int:
    """Entries with the right token and signature (they must be accepted), then with a wrong token, a forged
    signature and none at all (refused); returns how many were accepted."""
    values = [entry(id=f"pushed-{i}") for i in range(10)]
    body = json.dumps(values).encode()
    ms = int(time.time() * 1000)
    good = f"t={ms}, v1={hmac.new(RECEIVER_SIGNING.encode(), f'{ms}.'.encode() + body, hashlib.sha256).hexdigest()}"
    async with httpx.AsyncClient(timeout=30) as client:
        ok = await client.post(url, content=body, headers={"authorization": f"Bearer {RECEIVER_TOKEN}",
                                                           "workos-signature": good})
        assert ok.status_code == 200, ok.text
        for headers in ({"authorization": f"Bearer {RECEIVER_TOKEN}x", "workos-signature": good},
                        {"authorization": f"Bearer {RECEIVER_TOKEN}", "workos-signature": good[:-4] + "0000"},
                        {}):
            refused = await client.post(url, content=body, headers=headers)
            assert refused.status_code in (401, 403)
    return int(ok.json()["accepted"])


def relay_cli(config: Path, *args: str, env: dict[str, str]) -> str:
    done = subprocess.run([sys.executable, "-m", "relay", *args, "--config", str(config)], capture_output=True,
                          env=env, cwd=str(ROOT), timeout=120)
    return f"$ relay {' '.join(args)}\n(exit {done.returncode})\n{done.stdout.decode()}{done.stderr.decode()}"


async def test_no_secret_in_logs_reasons_metrics_or_commands(tmp_path: Path, moto: MotoS3, leaks: Leaks,
                                                              nursery: trio.Nursery) -> None:
    leaks.secret(moto.relay.secret)
    leaks.secret(moto.relay.id)
    hec = FakeHec([Token(HEC_TOKEN, enabled=False)])  # a token that was revoked
    await nursery.start(serve, hec)
    basic = await start_receiver(nursery)
    basic.always = Answer(413, f'{{"error": "too large", "seen": "Authorization: Basic {WEBHOOK_BASIC}", '
                               f'"user": "{WEBHOOK_USER}", "password": "{WEBHOOK_PASSWORD}"}}'.encode())
    bucket = await trio.to_thread.run_sync(moto.new_bucket)

    hec_echo = http_answer(502, "Bad Gateway", f"upstream refused Authorization: Splunk {HEC_TOKEN}".encode(),
                           "text/plain")
    s3_echo = s3_error(403, "Forbidden", "InvalidAccessKeyId",
                       f"The AWS Access Key Id {moto.relay.id} you provided does not exist in our records.")
    webhook_echo = http_answer(500, "Internal Server Error", (
        f'{{"debug": {{"authorization": "Bearer {WEBHOOK_BEARER}", "x-api-key": "{WEBHOOK_HEADER}", '
        f'"configured_secret": "{WEBHOOK_SIGNING}"}}}}').encode())
    creds = tmp_path / "credentials"
    creds.mkdir(mode=0o700)
    (creds / "webhook-signing").write_text(WEBHOOK_SIGNING + "\n")
    (creds / "receiver-signing").write_text(RECEIVER_SIGNING + "\n")
    (tmp_path / "webhook-token").write_text(WEBHOOK_BEARER + "\n")
    metrics_port, receiver_port, never_port = free_ports(3)
    never = ("127.0.0.1", never_port)
    with fault_proxy(never, mode="fail", fail_count=10**9, fail_response=hec_echo, methods=frozenset({"POST"})
                     ) as hec_proxy, \
            fault_proxy(("127.0.0.1", moto.port), mode="fail", fail_count=10**9, fail_response=s3_echo,
                        methods=frozenset({"PUT", "HEAD", "GET"})) as s3_proxy, \
            fault_proxy(never, mode="fail", fail_count=10**9, fail_response=webhook_echo,
                        methods=frozenset({"POST", "OPTIONS", "HEAD"})) as webhook_proxy:
        destinations: dict[str, Any] = {
            "hec-revoked": {"type": "splunk_hec", "url": hec.url, "token": "${HEC_TOKEN}", **FAST},
            "hec-echo": {"type": "splunk_hec", "url": hec_proxy.url, "token": "${HEC_TOKEN}", **FAST},
            "s3-echo": {"type": "s3", "bucket": bucket, "endpoint_url": s3_proxy.url, "region": "us-east-1",
                        "access_key_id": "${S3_KEY_ID}", "secret_access_key": "${S3_SECRET}", **FAST},
            "webhook-echo": {"type": "webhook", "url": f"{webhook_proxy.url}/audit",
                             "auth": {"bearer_token": f"${{file:{tmp_path / 'webhook-token'}}}"},
                             "headers": {"X-Api-Key": "${WEBHOOK_API_KEY}"},
                             "signing_secrets": ["${file:webhook-signing}"], **FAST},
            "webhook-basic": {"type": "webhook", "url": f"{basic.url}/audit",
                              "auth": {"basic": {"username": WEBHOOK_USER, "password": "${WEBHOOK_PASSWORD}"}},
                              **FAST},
        }
        sources = {"demo": {"type": "demo", "rate": 200, "count": 40},
                   "push": {"type": "http", "listen": f"127.0.0.1:{receiver_port}",
                            "auth": {"bearer_tokens": ["${RECEIVER_TOKEN}"],
                                     "signature_secret": "${file:receiver-signing}"}}}
        config = write_yaml(tmp_path / "relay.yaml", config_dict(
            tmp_path, sources, destinations,
            log={"level": "debug", "format": "json"}, metrics={"listen": f"127.0.0.1:{metrics_port}"}))
        env = {"HEC_TOKEN": HEC_TOKEN, "WEBHOOK_API_KEY": WEBHOOK_HEADER, "WEBHOOK_PASSWORD": WEBHOOK_PASSWORD,
               "RECEIVER_TOKEN": RECEIVER_TOKEN,
               "S3_KEY_ID": moto.relay.id, "S3_SECRET": moto.relay.secret, "CREDENTIALS_DIRECTORY": str(creds)}
        relay = RelayProcess(config, leaks.file("relay log", tmp_path / "relay.log"), env=env)
        state = tmp_path / "state"
        try:
            await trio.to_thread.run_sync(relay.start)
            pushed = await push_with_good_and_bad_credentials(f"http://127.0.0.1:{receiver_port}/v1/entries")

            def state_of(name: str) -> str:
                return str(destination_row(state, name).get("state"))

            def worst_said() -> bool:
                return (state_of("hec-revoked") == state_of("s3-echo") == "halted"
                        and state_of("hec-echo") == state_of("webhook-echo") == "retrying"
                        and len(dead_letters(state, "webhook-basic")) == 40 + pushed)

            await wait_until(worst_said, 60, "every destination to have failed its own way")
            metrics = (await trio.to_thread.run_sync(
                functools.partial(httpx.get, f"http://127.0.0.1:{metrics_port}/metrics", timeout=10))).text
            leaks.text("/metrics of the relay process", metrics)
            commands = [("status",), ("status", "--json"), ("dlq", "list", "-d", "webhook-basic"),
                        ("dlq", "show", "-d", "webhook-basic", "--id", "1"), ("check",), ("check", "--connect"),
                        ("quarantine", "list")]
            cli_env = {**relay.env}
            with ThreadPoolExecutor(max_workers=4) as pool:
                outputs = await trio.to_thread.run_sync(lambda: list(pool.map(
                    lambda args: relay_cli(config, *args, env=cli_env), commands)))
            for output in outputs:
                leaks.text(output.splitlines()[0], output)
            assert await trio.to_thread.run_sync(relay.terminate) == 0
        finally:
            relay.stop_quietly()

    status, status_json, dlq_list, dlq_show, check, connect, _ = outputs
    assert stat.S_IMODE(state.stat().st_mode) == 0o700, "the state directory is private"
    assert "(exit 0)" in status and "halted" in status and "retrying" in status
    assert "HEC code 1 (Token disabled)" in status
    assert "InvalidAccessKeyId" in status_json and "********" in status_json, "the echoed key id is masked"
    assert "Authorization: Basic ********" in dlq_list and '"password": "********"' in dlq_list
    assert '"action"' in dlq_show
    assert "OK (2 source(s), 5 destination(s))" in check
    assert "(exit 1)" in connect and "FAILED" in connect
    assert "audit_relay_destination_dead_letters" in metrics
    log = relay.log_text()
    assert "destination_halted" in log and "entries_dead_lettered" in log and "destination_retrying" in log
    assert "http_auth_failed" in log
