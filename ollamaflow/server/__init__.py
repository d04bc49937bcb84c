"""The main listener's HTTP/1.1 server: a lean connection for client traffic (``connection``,
``request``), the request path as every later layer sees it (``target``), with the admin API's
twisted.web requests carried over the same connection (``web``).
"""
