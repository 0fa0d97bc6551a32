"""Signatures of compressed model directories, in the OpenSSF model signing format (the ``model-signing`` library).

A signature is ``model.sig`` inside the model directory (model-signing's default name): a Sigstore bundle whose
DSSE payload is an in-toto statement listing the sha256 of **every other file** of the directory, ``lineage.json``
included (and through lineage.json's digests the source, calibration and stage outputs). The signature file
itself is the only file left out of its own digest; no file is ignored otherwise (git files, hidden files and
files added later all count). A one-byte change of any file, a file added or removed, or a signature made with
another key fails verification, naming the file.

Keys: an elliptic-curve (P-256/P-384/P-521) PEM private key signs, its PEM public key verifies (``generate_key``
makes a pair; ``openssl ecparam -name prime256v1 -genkey -noout -out key.pem`` and ``openssl ec -in key.pem
-pubout -out key.pub`` do the same). A signing certificate plus its chain (certificate mode) can be used instead
of a bare key. Nothing here logs or records key material: only paths and the public key's fingerprint (the
sha256 of its PEM form, which is also what the bundle records as the key hint).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dotresize.errors import DotResizeError

from .atomic import atomic_file
from .lineage import SIGNATURE, Mismatch, compare, file_digests
from .rundir import model_dir_of

log = logging.getLogger("dotresize.storage")

#: environment variable holding the password of an encrypted private key (never a command-line value)
PASSWORD_ENV = "DOTRESIZE_SIGNING_KEY_PASSWORD"


class SigningError(DotResizeError):
    """A key, certificate or model directory cannot be used for signing or verifying."""


@dataclass(frozen=True)
class SignatureCheck:
    """The outcome of checking ``model.sig`` of a model directory against a key or certificate chain."""

    ok: bool
    signer: str                                   # "key <fingerprint> (<path>)" or "certificate chain <paths>"
    files: int = 0                                # files covered by the signature (when it verified)
    mismatches: list[Mismatch] = field(default_factory=list)


# --- keys ---------------------------------------------------------------------------------------------------------
def _password() -> bytes | None:
    value = os.environ.get(PASSWORD_ENV)
    return value.encode() if value else None


def _write_private(path: Path, data: bytes) -> None:
    """Private key material: 0600 whatever the umask, created exclusively (never over an existing file)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def key_fingerprint(public_pem: bytes) -> str:
    """sha256 of a PEM public key (SubjectPublicKeyInfo): the hint model-signing records in the bundle."""
    return hashlib.sha256(public_pem).hexdigest()


def generate_key(private_path: str | os.PathLike, public_path: str | os.PathLike | None = None,
                 curve: str = "P-256") -> tuple[Path, Path, str]:
    """Write a new EC private key (PEM, mode 0600; encrypted with ``$DOTRESIZE_SIGNING_KEY_PASSWORD`` when set)
    and its public key (default ``<private>.pub``); returns (private, public, public key fingerprint)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    curves = {"P-256": ec.SECP256R1, "P-384": ec.SECP384R1, "P-521": ec.SECP521R1}
    if curve not in curves:
        raise SigningError(f"unknown curve {curve!r}: choose one of {', '.join(curves)}")
    private = Path(private_path).expanduser()
    public = Path(public_path).expanduser() if public_path else private.with_name(private.name + ".pub")
    for path in (private, public):
        if path.exists():
            raise SigningError(f"{path} already exists: choose another path (an existing key is never replaced)")
        if not path.parent.is_dir():
            raise SigningError(f"{path.parent} is not a directory: create it first")
    key = ec.generate_private_key(curves[curve]())
    password = _password()
    encryption = (serialization.BestAvailableEncryption(password) if password
                  else serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    _write_private(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              encryption))
    try:
        public.write_bytes(public_pem)
    except BaseException:
        private.unlink(missing_ok=True)
        raise
    return private.resolve(), public.resolve(), key_fingerprint(public_pem)


def _load_private(path: Path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if not path.is_file():
        raise SigningError(f"private key {path} does not exist: make one with `dotresize keygen {path}`")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), _password())
    except TypeError:
        raise SigningError(f"private key {path} is encrypted: set {PASSWORD_ENV} to its password") from None
    except ValueError:
        raise SigningError(f"{path} is not a PEM private key (or {PASSWORD_ENV} is not its password): pass the "
                           "key made by `dotresize keygen` or `openssl ecparam -genkey`") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name not in ("secp256r1", "secp384r1",
                                                                                  "secp521r1"):
        raise SigningError(f"{path} is not an elliptic-curve P-256/P-384/P-521 key, which the model signing "
                           "format requires: make one with `dotresize keygen`")
    return key


def _public_pem(path: Path) -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if not path.is_file():
        raise SigningError(f"public key {path} does not exist: pass the .pub file made with the signing key")
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except ValueError:
        raise SigningError(f"{path} is not a PEM public key: pass the .pub file of `dotresize keygen` (or "
                           "`openssl ec -in KEY -pubout`)") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise SigningError(f"{path} is not an elliptic-curve public key")
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


# --- signing ------------------------------------------------------------------------------------------------------
def _hashing(extra_ignored: Sequence[str] = ()):
    """Every file but the signature (and ``extra_ignored``), one sha256 per file; git files are not ignored."""
    from model_signing import hashing

    return (hashing.Config().use_file_serialization(hashing_algorithm="sha256", allow_symlinks=False)
            .set_ignored_paths(paths=[SIGNATURE, *extra_ignored], ignore_git_paths=False))


def _model_dir(model_dir: str | os.PathLike) -> Path:
    path = model_dir_of(model_dir)  # a run directory: its model
    if not path.is_dir():
        raise SigningError(f"{model_dir} is not a directory: pass a compressed model directory (or its run "
                           "directory)")
    symlinks = [p for p in path.rglob("*") if p.is_symlink()]
    if symlinks:
        raise SigningError(f"{symlinks[0]} is a symbolic link: a signed model directory holds only plain files")
    return path.resolve()


def sign_model_dir(model_dir: str | os.PathLike, private_key: str | os.PathLike, *,
                   certificate: str | os.PathLike | None = None,
                   certificate_chain: Iterable[str | os.PathLike] = ()) -> Path:
    """Sign every file of ``model_dir`` (lineage.json included) with ``private_key``; returns the path of the
    signature, ``<model_dir>/model.sig`` (replaced if present, written atomically).

    With ``certificate`` (the signing certificate of the key, PEM) and ``certificate_chain`` (intermediate/root
    PEM files) the bundle carries the certificate chain instead of a key hint (certificate mode).
    """
    from model_signing import signing

    directory = _model_dir(model_dir)
    key_path = Path(private_key).expanduser()
    _load_private(key_path)  # a one-line error for a missing, encrypted or unsupported key
    config = signing.Config().set_hashing_config(_hashing())
    try:
        if certificate is not None:
            cert = Path(certificate).expanduser()
            chain = [Path(c).expanduser() for c in certificate_chain]
            for path in (cert, *chain):
                if not path.is_file():
                    raise SigningError(f"certificate {path} does not exist")
            if _password():
                raise SigningError(f"certificate mode needs an unencrypted key: unset {PASSWORD_ENV}")
            config.use_certificate_signer(private_key=key_path, signing_certificate=cert, certificate_chain=chain)
        else:
            # model-signing 1.1.1 hands the password to cryptography as is, which wants bytes (a str fails)
            config.use_elliptic_key_signer(private_key=key_path, password=_password())
    except SigningError:
        raise
    except Exception as error:  # a certificate that does not parse or does not match the key
        raise SigningError(f"cannot sign with {key_path}: {_first_line(error)}") from None
    final = directory / SIGNATURE
    for stale in directory.glob(f".{SIGNATURE}.tmp-*"):  # left by an interrupted signing
        stale.unlink(missing_ok=True)
    with atomic_file(final, prefix=f".{SIGNATURE}.tmp-", umask=False) as staged:
        os.unlink(staged.path)  # model-signing writes the bundle itself, to a file that is not there yet
        config.sign(directory, Path(staged.path))  # hashes the files first, then writes the bundle
    return final


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def check_signing_key(private_key: str | os.PathLike) -> Path:
    """Fail early (one line) when ``private_key`` cannot sign: call it before any work is started."""
    path = Path(private_key).expanduser()
    _load_private(path)
    return path.resolve()


def sign_run_model(run, private_key: str | os.PathLike) -> str:
    """Sign the ``model/`` directory of a run directory (:class:`storage.RunDir`, local or remote) after its final
    lineage.json is written; returns the signature's URI. A remote run's model is signed in a local copy and the
    signature uploaded beside it."""
    from .rundir import MODEL

    with run.local_copy(MODEL) as model_dir:
        path = sign_model_dir(model_dir, private_key)
        if not run.is_local:
            run.write_bytes(f"{MODEL}/{SIGNATURE}", path.read_bytes())
    return run.uri(f"{MODEL}/{SIGNATURE}")


# --- reading and verifying ----------------------------------------------------------------------------------------
def read_bundle(signature: str | os.PathLike) -> dict:
    """The JSON of a signature bundle (unverified); raises SigningError when it is not one."""
    try:
        bundle = json.loads(Path(signature).read_text())
        if not isinstance(bundle, dict) or "dsseEnvelope" not in bundle:
            raise ValueError
    except (OSError, ValueError, UnicodeDecodeError):
        raise SigningError(f"{signature} is not a model signing bundle") from None
    return bundle


def signed_digests(bundle: dict) -> dict[str, str]:
    """{file: sha256} that the bundle's in-toto statement lists (unverified: check the signature first)."""
    statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    return {str(r["name"]): str(r["digest"]) for r in statement["predicate"]["resources"]}


def signature_info(model_dir: str | os.PathLike) -> dict | None:
    """What ``model.sig`` says about itself, unverified (for ``dotresize lineage``): file sha256, mode (key or
    certificate), the key fingerprint or the signing certificate's subject, the number of files it covers."""
    path = Path(model_dir) / SIGNATURE
    if not path.is_file():
        return None
    info: dict = {"file": SIGNATURE, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    try:
        bundle = read_bundle(path)
        material = bundle.get("verificationMaterial") or {}
        if material.get("publicKey"):
            info.update(mode="key", key_fingerprint=material["publicKey"].get("hint"))
        elif material.get("x509CertificateChain"):
            from cryptography import x509

            first = material["x509CertificateChain"]["certificates"][0]["rawBytes"]
            cert = x509.load_der_x509_certificate(base64.b64decode(first))
            info.update(mode="certificate", certificate_subject=cert.subject.rfc4514_string())
        else:
            info.update(mode="sigstore")
        info["files"] = len(signed_digests(bundle))
    except Exception as error:  # a bundle model-signing or cryptography cannot decode: said in the info
        log.debug("%s is not a readable signature bundle: %s", path, _first_line(error))
        info["readable"] = False
    return info


def verify_model_dir(model_dir: str | os.PathLike, *, public_key: str | os.PathLike | None = None,
                     certificate_chain: Sequence[str | os.PathLike] = (),
                     ignore: Sequence[str] = ()) -> SignatureCheck:
    """Check ``<model_dir>/model.sig`` against ``public_key`` (or, in certificate mode, ``certificate_chain``)
    and every file of ``model_dir`` against the digests it signs. ``ignore``: extra file names that are not part
    of the model (e.g. the ``MLmodel`` file MLflow adds to logged artifacts). Never raises for a bad signature:
    the result names the disagreeing files (or ``model.sig`` itself when it is not a valid signature by that key).
    """
    from model_signing import verifying

    directory = Path(model_dir)
    signature = directory / SIGNATURE
    if public_key is not None:
        key_path = Path(public_key).expanduser()
        fingerprint = key_fingerprint(_public_pem(key_path))
        signer = f"key {fingerprint[:16]} ({key_path})"
        config = verifying.Config().use_elliptic_key_verifier(public_key=key_path)
    elif certificate_chain:
        paths = [Path(c).expanduser() for c in certificate_chain]
        for path in paths:
            if not path.is_file():
                raise SigningError(f"certificate {path} does not exist")
        signer = f"certificate chain {', '.join(str(p) for p in paths)}"
        try:
            config = verifying.Config().use_certificate_verifier(certificate_chain=paths)
        except Exception as error:
            raise SigningError(f"cannot read the certificate chain: {_first_line(error)}") from None
    else:
        raise SigningError("pass a public key or a certificate chain to check a signature against")
    if not signature.is_file():
        return SignatureCheck(False, signer, 0, [Mismatch(SIGNATURE, f"a signature by {signer}", "missing",
                                                          "verify")])
    config.set_hashing_config(_hashing(ignore))
    try:
        config.verify(directory, signature)
    except ValueError as error:
        text = str(error)
        if text.startswith("Signature mismatch"):  # a valid signature whose digests disagree with the files
            return SignatureCheck(False, signer, 0, _file_mismatches(directory, signature, signer, ignore, text))
        return SignatureCheck(False, signer, 0, [_bad_signature(signer, text)])
    except Exception as error:  # an unreadable bundle, a signature that does not verify, a bad chain
        return SignatureCheck(False, signer, 0, [_bad_signature(signer, _first_line(error))])
    return SignatureCheck(True, signer, len(signed_digests(read_bundle(signature))))


def _bad_signature(signer: str, why: str) -> Mismatch:
    if why.startswith("Key mismatch"):
        why = "signed with another key"
    elif not why or why == "InvalidSignature":
        why = "the signature does not verify"
    return Mismatch(SIGNATURE, f"a signature by {signer} over every file (lineage.json included)",
                    f"not one ({why})", "verify")


def _file_mismatches(directory: Path, signature: Path, signer: str, ignore: Sequence[str],
                     message: str) -> list[Mismatch]:
    """One Mismatch per file whose sha256 differs from the (verified) signed manifest, or that is missing or
    not signed; falls back to the file names in model-signing's message."""
    against = f"{SIGNATURE} (signed by {signer})"
    try:
        expected = signed_digests(read_bundle(signature))
        actual = file_digests(directory, exclude=(SIGNATURE, *ignore), hidden=True)
        found = compare(expected, actual, against)
    except Exception as error:  # the bundle's manifest cannot be read: name the files from the message instead
        log.debug("signed digests of %s not readable: %s", signature, _first_line(error))
        found = []
    if found:
        return found
    names = re.findall(r"Hash mismatch for '([^']+)'", message) or ["(unknown file)"]
    return [Mismatch(name, "the signed digest", "a different one", against) for name in names]


__all__ = ["SIGNATURE", "PASSWORD_ENV", "SigningError", "SignatureCheck", "generate_key", "sign_model_dir",
           "sign_run_model", "check_signing_key",
           "verify_model_dir", "signature_info", "signed_digests", "read_bundle", "key_fingerprint"]
