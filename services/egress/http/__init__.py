"""The egress's HTTP side: ``sender`` (body, signature, one attempt and its result),
``client`` (a small HTTP/1.1 client with a keep-alive pool and the SSRF guard) and
``wire`` (the request head, one connection's protocol and parser)."""
