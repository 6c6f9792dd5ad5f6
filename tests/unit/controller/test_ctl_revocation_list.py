"""The controller CA's certificate revocation list, on real files."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from cryptography import x509

from controller.certificates import CRL_VALID_DAYS, CertificateAuthority, new_client_key, public_key_pem


def test_the_ca_always_has_a_current_list_signed_by_it_and_renews_it_at_half_its_validity(
    tmp_path: Path,
) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path / "ca")
    empty = x509.load_pem_x509_crl(ca.crl_file.read_bytes())
    assert len(empty) == 0 and empty.is_signature_valid(ca.cert.public_key())  # type: ignore[arg-type]

    issued = ca.issue_client("cam-1", public_key_pem(new_client_key()))
    ca.write_crl([(issued.serial, 1_800_000_000.0)])
    crl = x509.load_pem_x509_crl(ca.crl_file.read_bytes())
    entry = crl.get_revoked_certificate_by_serial_number(issued.serial)
    assert entry is not None and entry.revocation_date_utc.timestamp() == 1_800_000_000.0
    assert crl.is_signature_valid(ca.cert.public_key())  # type: ignore[arg-type]
    assert ca.crl_file.stat().st_mode & 0o777 == 0o644, "the broker reads it"

    now = dt.datetime.now(dt.UTC)
    assert not ca.crl_due(now)
    assert ca.crl_due(now + dt.timedelta(days=CRL_VALID_DAYS / 2 + 1))

    # A lost list comes back when the CA is loaded (controller.revocation then writes every serial).
    ca.crl_file.unlink()
    assert ca.crl_due()
    CertificateAuthority.load_or_create(tmp_path / "ca")
    assert ca.crl_file.exists()
