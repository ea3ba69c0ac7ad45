"""NetFlow v5/v9 and IPFIX export datagrams as flow records (`decode.Collector`)."""
