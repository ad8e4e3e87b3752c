"""Storage failures are one-line errors with a non-zero exit, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.engine.conftest import free_port

REPO = Path(__file__).resolve().parents[2]
CLEAN = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "RAY_ADDRESS"}


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ddm_ray.cli", "run", "--engine", "local", "--quiet",
                           "--max-train", "200", "--epochs", "1", "--clusters-per-class", "1", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.parametrize(
    "case,extra_env,args,expect",
    [
        ("missing credentials", {"AWS_ENDPOINT_URL": "http://127.0.0.1:{port}", "AWS_CONFIG_FILE": "/nonexistent",
                                 "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_EC2_METADATA_DISABLED": "true"},
         ["--out", "s3://bucket/run"], "credentials"),
        ("unknown storage option", {}, ["--out", "s3://bucket/run", "--storage-option", "bogus=1"],
         "unknown --storage-option 'bogus'"),
        ("unreachable endpoint", {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y", "AWS_DEFAULT_REGION": "us-east-1",
                                  "AWS_MAX_ATTEMPTS": "1", "AWS_RETRY_MODE": "standard"},
         ["--out", "s3://bucket/run", "--storage-option", "endpoint_url=http://127.0.0.1:{port}"], "cannot"),
    ],
)
def test_storage_errors_are_one_line(case, extra_env, args, expect):
    port = str(free_port())
    env = {**CLEAN, **{k: v.replace("{port}", port) for k, v in extra_env.items()}}
    r = _run([a.replace("{port}", port) for a in args], env)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, (case, r.stderr[-1500:])
    assert len(lines) == 1 and lines[0].startswith("ddm-ray: error:") and expect in lines[0].lower() + lines[0], lines
    assert "\x1b[" not in r.stderr


def test_credentials_never_on_the_command_line_and_urls_redacted(tmp_path, capsys):
    from ddm_ray.cli import main
    from ddm_ray.config import DataConfig, RunConfig
    from ddm_ray.store.fs import redact, storage_options_file

    assert main(["run", "--out", str(tmp_path / "o"), "--storage-option", "secret=MARKER-SECRET"]) == 2
    err = capsys.readouterr().err
    assert "credential on the command line" in err and "MARKER-SECRET" not in err
    url = "https://bucket.s3.amazonaws.com/train.parquet?X-Amz-Signature=MARKER-SIG&X-Amz-Credential=AKIA"
    assert "MARKER" not in redact(url) and redact(url).startswith("https://bucket.s3.amazonaws.com/train.parquet")
    assert redact("https://user:MARKER@host/x") == "https://<redacted>@host/x"
    assert redact("/plain/path.parquet") == "/plain/path.parquet"
    a = RunConfig(data=DataConfig(dataset="parquet", train=url, test=url.replace("MARKER-SIG", "OTHER")))
    b = RunConfig(data=DataConfig(dataset="parquet", train=url.replace("MARKER-SIG", "RESIGNED"), test=url))
    assert "MARKER" not in str(a.to_dict()) and a.hash() == b.hash(), "a re-signed URL keeps the config hash"
    f = tmp_path / "creds"
    f.write_text("# credentials\nkey=AKIA\nsecret=MARKER-SECRET\n")
    assert storage_options_file(str(f)) == {"key": "AKIA", "secret": "MARKER-SECRET"}
    bad = ["run", "--dataset", "parquet", "--train", url, "--test", url, "--out", str(tmp_path / "o2"), "--quiet"]
    assert main(bad) == 2
    err = capsys.readouterr().err
    assert "MARKER" not in err and len(err.strip().splitlines()) == 1
