"""Sources: each turns one kind of input (capture file, flow log, kernel table) into Flows.

A source may read files, sockets or kernel state; it never evaluates policy.
"""
