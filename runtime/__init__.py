"""Runtime: launching and supervising tritonserver, serving the gateway, the process settings they share.

Above the model core (embcap/) and the gateway (gateway/); below the entry points
(server.py) and the tooling (bench/, evaluate/, training/, doctor/, tests/).
"""

CHECKPOINT_ENV = "EMBCAP_CHECKPOINT"  # the checkpoint server.py serves (the Dockerfile sets it; doctor reads it there)
