"""JSON-lines flow logs (the product's own format, which the evidence log also writes).

    jsonl.py     the line reader: every rule and every error message (`file:line: field: message`)
    table.py     the bulk column reader for plain logs and evidence logs; None for anything else
    _flowlog.c   the optional C column reader of the narrow form `Flow.to_json` writes
"""
