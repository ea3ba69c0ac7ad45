"""What the register, inventory and HTML report tests share: one policy, one recipient, the
documentation ranges made public, and a capture time."""

from __future__ import annotations

T = 1750000000.0  # 2025-06-15
DOC_PUBLIC = ["--public-net", "198.51.100.0/24", "--public-net", "203.0.113.0/24"]
EU_POLICY = "version: 1\nname: eu\nhome: [EU]\nallow: {jurisdictions: [EEA]}\n"


def payroll(transfer_policy: str | None = "eu") -> str:
    """A register whose one recipient, Example Payroll Inc. (US), is matched by *.payroll.example; with an
    SCC module 2 transfer for `transfer_policy` (none when None)."""
    text = """\
version: 1
recipients:
  - id: payroll
    name: Example Payroll Inc.
    role: processor
    established_in: US
    processing_locations: [US]
    match: {hostnames: ["*.payroll.example"]}
"""
    if transfer_policy:
        text += (f"    transfers:\n      - {{policy: {transfer_policy}, basis: scc, module: 2, "
                 "reference: \"SCC-7\", owner: dpo@example.com, expires: 2099-01-01}\n")
    return text


def write_setup(tmp, register: str) -> tuple:
    """(policy folder holding `eu`, register file) under `tmp`."""
    (tmp / "pol").mkdir(exist_ok=True)
    (tmp / "pol" / "eu.yaml").write_text(EU_POLICY)
    (tmp / "reg.yaml").write_text(register)
    return tmp / "pol", tmp / "reg.yaml"
