"""Names on flows: what a flow's destination was called when it was opened.

Hand-decoded parsers for the packets that carry names (`dns.py`, `tls.py`, `quic.py`), the
transport slice they read from (`packet.py`), the passive DNS answer cache (`answers.py`), and
`extract.py`, which feeds packets through all of them and names flows. The same extractor runs in
`audit` on captures and in the live capture source, so a dry run sees the names a live run sees.
"""
