"""HTTP/1.1 messages parsed by llhttp (Node.js's parser, through ``httptools``), both ways:
requests from clients (:mod:`.request`) and responses from backends (:mod:`.response`), with
the rules llhttp leaves to its user in one place (:mod:`.rules`): limits, targets, Host.
"""
