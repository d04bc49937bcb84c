"""The HTTP/1.1 server, the lowest layer of the request path; it imports nothing above it.

``interfaces`` holds its contracts (what a connection needs from whoever serves its requests,
what the gateway sees of a request); ``acceptor`` builds a ``connection`` per client up to the
cap (``refusal`` past it), sweeps and drains them; a request's body goes to the receiver its
handler chooses: ``body`` (a client request, ``request``, for the gateway) or ``web``
(twisted.web over the same connection). ``target`` normalises paths, ``errors`` writes the
server's own error responses, ``failures`` answers a bug, ``dates`` caches the Date header.
"""
