"""Runtime: launching and supervising tritonserver, serving the gateway, the process settings they share.

Above the model core (embcap/) and the gateway (gateway/); below the entry points
(server.py) and the tooling (bench/, evaluate/, training/, doctor/, tests/).
"""
