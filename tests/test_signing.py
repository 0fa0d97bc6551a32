"""Issue 12, item 5: ``verify`` on a copy, and signed lineage.

A tiny compression through the pipeline (logged to MLflow), signed with ``dotresize sign`` and copied to a fresh
directory where no MLflow can be found: ``dotresize verify COPY --public-key KEY`` passes there; every one-byte
change of any of its files (the signature included) fails naming that file; a copy whose code and lineage.json
were changed together and re-signed with another key fails too.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_model_dir
from flows.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("dotresize: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def signed(tmp_path_factory, tiny_data_dir, prefect_api):
    """(run model dir, keys dir, MLflow home): one compression with a signing key (signed before it is
    registered in MLflow)."""
    import tasks.lineage
    from flows.compress import compress_flow

    root = tmp_path_factory.mktemp("signed")
    keys = root / "keys"
    keys.mkdir()
    assert main(["keygen", str(keys / "signing.pem")]) == 0
    assert main(["keygen", str(keys / "attacker.pem")]) == 0
    saved = {k: os.environ.get(k) for k in ("DOTRESIZE_DATA_DIR", "DOTRESIZE_HOME", "MLFLOW_TRACKING_URI")}
    os.environ.update(DOTRESIZE_DATA_DIR=str(tiny_data_dir), DOTRESIZE_HOME=str(root / "home"))
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    # lineage.json records the git state of the checkout, which others may change between the two runs
    code_version = tasks.lineage.code_version
    tasks.lineage.code_version = lambda: {"package": "dotresize", "version": "test", "git_commit": None,
                                          "git_dirty": None}
    try:
        src = write_model_dir(root / "ckpt" / "checkpoint-9", seed=9)
        result = compress_flow(model=str(src), run_dir=str(root / "runs" / "tiny"), ratio=0.25, calib_samples=8,
                               calib_seqlen=32, seed=5, register_name="tiny-signed", progress=False, n_workers=1,
                               signing_key=str(keys / "signing.pem"))  # signed before it is registered
        assert result["signature"].endswith("model.sig")
    finally:
        tasks.lineage.code_version = code_version
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    assert result["mlflow_run_id"] and result["model_version"] == 1  # an MLflow record, not where copies go
    return Path(result["model_dir"]), keys, root / "home"


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """A fresh directory with no MLflow anywhere: no DOTRESIZE_HOME, no MLFLOW_TRACKING_URI, cwd inside it."""
    monkeypatch.delenv("DOTRESIZE_HOME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    where = tmp_path / "elsewhere"
    where.mkdir()
    monkeypatch.chdir(where)
    return where


def _copy(model_dir: Path, fresh: Path) -> Path:
    copy = fresh / "copy"
    shutil.copytree(model_dir, copy)
    return copy


def test_pristine_copy_verifies_offline_and_every_one_byte_change_fails(signed, fresh, capsys):
    model_dir, keys, _ = signed
    public = str(keys / "signing.pem.pub")
    copy = _copy(model_dir, fresh)
    names = sorted(p.name for p in copy.iterdir())
    assert "model.sig" in names and "lineage.json" in names and "modeling_dotresize.py" in names

    code, out, err = _run(capsys, "verify", str(copy), "--public-key", public)
    assert code == 0, out + err
    assert f"model.sig: all {len(names) - 1} files (lineage.json included) signed by key" in out
    assert "MLflow: no record of this model here" in out and "verified: every digest matches" in out
    assert not list(fresh.rglob("mlflow.db")) and not (fresh / "mlruns").exists()

    # the same from a separate process whose environment names no MLflow at all
    env = {k: v for k, v in os.environ.items() if k not in ("DOTRESIZE_HOME", "MLFLOW_TRACKING_URI")}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run([sys.executable, "-m", "flows.cli", "verify", str(copy), "--public-key", public, "--json"],
                          cwd=fresh, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["ok"] and report["signature"]["checked"] and report["signature"]["ok"]

    # --require-mlflow asks for the extra witness, which this copy has not got here
    code, out, err = _run(capsys, "verify", str(copy), "--public-key", public, "--require-mlflow")
    assert code != 0 and "MLflow" in _error_line(err)

    for name in names:  # every file of the model directory, the signature itself included
        path = copy / name
        original = path.read_bytes()
        positions = sorted({0, len(original) // 2, len(original) - 1})
        for position in positions:
            changed = bytearray(original)
            changed[position] ^= 0x01
            path.write_bytes(bytes(changed))
            try:
                code, out, err = _run(capsys, "verify", str(copy), "--public-key", public)
            finally:
                path.write_bytes(original)
            assert code == 1, f"{name} byte {position}: {out}"
            line = _error_line(err)
            assert name in line, f"{name} byte {position}: {line}"
            if name != "model.sig":  # the signed digest and the one found
                assert hashlib.sha256(bytes(changed)).hexdigest() in line, line
                assert hashlib.sha256(original).hexdigest() in line, line
    assert _run(capsys, "verify", str(copy), "--public-key", public)[0] == 0

    # a file added to, or removed from, the copy
    (copy / "extra.txt").write_text("x")
    code, _, err = _run(capsys, "verify", str(copy), "--public-key", public)
    assert code == 1 and "extra.txt" in _error_line(err)
    (copy / "extra.txt").unlink()
    moved = (copy / "tokenizer.json").read_bytes()
    (copy / "tokenizer.json").unlink()
    code, _, err = _run(capsys, "verify", str(copy), "--public-key", public)
    assert code == 1 and "tokenizer.json" in _error_line(err)
    (copy / "tokenizer.json").write_bytes(moved)
    assert _run(capsys, "verify", str(copy), "--public-key", public)[0] == 0


def _tamper(copy: Path) -> None:
    """Change the modeling code and patch lineage.json to match (what the issue's reporter did)."""
    code = copy / "modeling_dotresize.py"
    code.write_text(code.read_text() + "\n# harmless-looking change\n")
    lineage = json.loads((copy / "lineage.json").read_text())
    lineage["model"]["modeling_dotresize.py"] = hashlib.sha256(code.read_bytes()).hexdigest()
    (copy / "lineage.json").write_text(json.dumps(lineage, indent=2, sort_keys=True) + "\n")


def test_a_lineage_rewritten_and_resigned_with_another_key_fails(signed, fresh, capsys):
    model_dir, keys, _ = signed
    public = str(keys / "signing.pem.pub")
    copy = _copy(model_dir, fresh)
    _tamper(copy)
    # lineage.json alone cannot tell (and nothing else is here): the report says so instead of vouching
    code, out, err = _run(capsys, "verify", str(copy), "--no-mlflow")
    assert code == 0 and "not checked: pass --public-key" in out, out + err
    # the old signature no longer matches: both changed files are named
    code, out, err = _run(capsys, "verify", str(copy), "--public-key", public)
    assert code == 1 and "lineage.json" in _error_line(err) and "modeling_dotresize.py" in out

    # re-signed with the attacker's key: every digest agrees with lineage.json, the signature is not ours
    assert main(["sign", str(copy), "--private-key", str(keys / "attacker.pem")]) == 0
    capsys.readouterr()
    code, out, err = _run(capsys, "verify", str(copy), "--public-key", public)
    line = _error_line(err)
    assert code == 1 and "model.sig" in line and "signed with another key" in line, line
    assert _run(capsys, "verify", str(copy), "--public-key", str(keys / "attacker.pem.pub"))[0] == 0

    # the attacker's bundle with its key hint removed still fails: the signature itself does not verify
    bundle = json.loads((copy / "model.sig").read_text())
    bundle["verificationMaterial"]["publicKey"]["hint"] = ""
    (copy / "model.sig").write_text(json.dumps(bundle))
    code, out, err = _run(capsys, "verify", str(copy), "--public-key", public)
    assert code == 1 and "model.sig" in _error_line(err)

    # no signature at all, when a key is given
    (copy / "model.sig").unlink()
    code, out, err = _run(capsys, "verify", str(copy), "--public-key", public)
    assert code == 1 and "model.sig" in _error_line(err) and "missing" in err


def test_lineage_shows_the_signature_and_keys_stay_private(signed, fresh, capsys):
    model_dir, keys, _ = signed
    public_pem = (keys / "signing.pem.pub").read_bytes()
    code, out, err = _run(capsys, "lineage", str(model_dir), "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["signature"]["key_fingerprint"] == hashlib.sha256(public_pem).hexdigest()
    assert data["signature"]["mode"] == "key"
    code, out, _ = _run(capsys, "lineage", str(model_dir))
    assert "signature    model.sig over" in out
    assert (keys / "signing.pem").stat().st_mode & 0o777 == 0o600  # private key: owner only, whatever the umask
    private = (keys / "signing.pem").read_text()
    assert "PRIVATE KEY" in private
    # nothing the pipeline or the signature keeps holds key material
    body = "".join(part for part in private.splitlines()[1:-1])
    for path in [*model_dir.rglob("*"), *model_dir.parent.rglob("*.json")]:
        if path.is_file():
            assert body[:40] not in path.read_text(errors="replace"), path


def test_keygen_and_sign_errors_are_one_line(signed, fresh, capsys, monkeypatch):
    model_dir, keys, _ = signed
    code, _, err = _run(capsys, "keygen", str(keys / "signing.pem"))
    assert code == 1 and "already exists" in _error_line(err)
    code, _, err = _run(capsys, "sign", str(model_dir), "--private-key", str(fresh / "nokey.pem"))
    assert code == 1 and "dotresize keygen" in _error_line(err)
    code, _, err = _run(capsys, "sign", str(model_dir), "--private-key", str(keys / "signing.pem.pub"))
    assert code == 1 and "not a PEM private key" in _error_line(err)
    code, _, err = _run(capsys, "sign", str(fresh / "nowhere"), "--private-key", str(keys / "signing.pem"))
    assert code == 1 and "not a directory" in _error_line(err)
    code, _, err = _run(capsys, "verify", str(model_dir), "--public-key", str(fresh / "none.pub"))
    assert code == 1 and "does not exist" in _error_line(err)
    code, _, err = _run(capsys, "verify", str(model_dir), "--public-key", str(keys / "signing.pem"))
    assert code == 1 and "not a PEM public key" in _error_line(err)

    # an encrypted key: its password comes from the environment, never the command line
    monkeypatch.setenv("DOTRESIZE_SIGNING_KEY_PASSWORD", "correct horse")
    assert _run(capsys, "keygen", str(fresh / "locked.pem"))[0] == 0
    assert b"ENCRYPTED" in (fresh / "locked.pem").read_bytes()
    copy = _copy(model_dir, fresh)
    assert _run(capsys, "sign", str(copy), "--private-key", str(fresh / "locked.pem"))[0] == 0
    assert _run(capsys, "verify", str(copy), "--public-key", str(fresh / "locked.pem.pub"))[0] == 0
    monkeypatch.setenv("DOTRESIZE_SIGNING_KEY_PASSWORD", "wrong")
    code, _, err = _run(capsys, "sign", str(copy), "--private-key", str(fresh / "locked.pem"))
    assert code == 1 and "DOTRESIZE_SIGNING_KEY_PASSWORD" in _error_line(err)
    monkeypatch.delenv("DOTRESIZE_SIGNING_KEY_PASSWORD")
    code, _, err = _run(capsys, "sign", str(copy), "--private-key", str(fresh / "locked.pem"))
    assert code == 1 and "encrypted" in _error_line(err)


def _certificates(where: Path) -> tuple[Path, Path, Path, Path]:
    """(CA certificate, leaf key, leaf certificate, another CA's certificate), PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=5)
    later = now + datetime.timedelta(days=30)

    def name(text):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])

    def ca(label):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(name(label)).issuer_name(name(label))
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now).not_valid_after(later)
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                             key_encipherment=False, data_encipherment=False, key_agreement=False,
                                             key_cert_sign=True, crl_sign=True, encipher_only=False,
                                             decipher_only=False), critical=True)
                .sign(key, hashes.SHA256()))
        return key, cert

    ca_key, ca_cert = ca("dotresize test CA")
    _, other_cert = ca("another CA")
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder().subject_name(name("model signer")).issuer_name(ca_cert.subject)
            .public_key(leaf_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(later)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = [where / n for n in ("ca.pem", "leaf.key", "leaf.pem", "other-ca.pem")]
    paths[0].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(leaf_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()))
    paths[2].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths[3].write_bytes(other_cert.public_bytes(serialization.Encoding.PEM))
    return paths[0], paths[1], paths[2], paths[3]


def test_certificate_mode(signed, fresh, capsys):
    model_dir, _, _ = signed
    ca, key, cert, other = _certificates(fresh)
    copy = _copy(model_dir, fresh)
    code, out, err = _run(capsys, "sign", str(copy), "--private-key", str(key), "--certificate", str(cert),
                          "--certificate-chain", str(ca))
    assert code == 0, out + err
    assert "CN=model signer" in out
    code, out, err = _run(capsys, "verify", str(copy), "--certificate-chain", str(ca))
    assert code == 0, out + err
    code, out, err = _run(capsys, "verify", str(copy), "--certificate-chain", str(other))
    assert code == 1 and "model.sig" in _error_line(err)
    config = copy / "config.json"
    config.write_text(config.read_text() + " ")
    code, out, err = _run(capsys, "verify", str(copy), "--certificate-chain", str(ca))
    assert code == 1 and "config.json" in _error_line(err)


def test_sign_model_dir_api_covers_every_file(tmp_path):
    """The function the export calls: every file (hidden and git files too) is signed, model.sig is not."""
    from storage.signing import generate_key, sign_model_dir, signed_digests, read_bundle, verify_model_dir

    model = tmp_path / "model"
    model.mkdir()
    for name, text in (("config.json", "{}"), (".gitattributes", "*"), ("lineage.json", "{}")):
        (model / name).write_text(text)
    private, public, fingerprint = generate_key(tmp_path / "k.pem")
    signature = sign_model_dir(model, private)
    assert signature == model / "model.sig"
    digests = signed_digests(read_bundle(signature))
    assert sorted(digests) == [".gitattributes", "config.json", "lineage.json"]
    statement = json.loads(base64.b64decode(read_bundle(signature)["dsseEnvelope"]["payload"]))
    assert statement["predicate"]["serialization"]["ignore_paths"] == ["model.sig"]
    assert verify_model_dir(model, public_key=public).ok
    sign_model_dir(model, private)  # signing again replaces the signature and leaves nothing else behind
    assert sorted(p.name for p in model.iterdir()) == [".gitattributes", "config.json", "lineage.json",
                                                        "model.sig"]
    (model / ".gitattributes").write_text("**")
    check = verify_model_dir(model, public_key=public)
    assert not check.ok and [m.file for m in check.mismatches] == [".gitattributes"]


def test_registered_signed_model_verifies_and_mlflow_records_no_key(signed, fresh, capsys, monkeypatch):
    """The signature is logged with the model; the registry copy verifies (MLflow's MLmodel left out), and MLflow
    holds the signature's digest and the public key's fingerprint, never key material."""
    from mlflow import MlflowClient

    model_dir, keys, home = signed
    monkeypatch.setenv("DOTRESIZE_HOME", str(home))
    public = str(keys / "signing.pem.pub")
    code, out, err = _run(capsys, "verify", "models:/tiny-signed/1", "--public-key", public)
    assert code == 0 and "model.sig: all" in out, out + err
    code, out, err = _run(capsys, "verify", str(model_dir), "--public-key", public)
    assert code == 0 and "matches MLflow run" in out, out + err
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    version = client.get_model_version("tiny-signed", "1")
    assert version.tags["dotresize.signature_sha256"] == hashlib.sha256((model_dir / "model.sig").read_bytes()
                                                                        ).hexdigest()
    assert version.tags["dotresize.signing_key"] == hashlib.sha256((keys / "signing.pem.pub").read_bytes()
                                                                   ).hexdigest()
    aliases = {k: int(v) for k, v in client.get_registered_model("tiny-signed").aliases.items()}
    assert aliases["current"] == 1 and any(a.startswith("current-dot-25-") for a in aliases)
    private = (keys / "signing.pem").read_text()
    body = "".join(private.splitlines()[1:-1])
    run = client.get_run(version.run_id)
    recorded = json.dumps([run.data.params, run.data.tags, dict(version.tags)])
    assert body[:40] not in recorded and "signing.pem" not in recorded
    for path in (home / "mlartifacts").rglob("*"):
        if path.is_file():
            assert body[:40] not in path.read_text(errors="replace"), path
