"""Standard egress of a session: one reader of its frames (fanout), one shared H.264 + AAC
encode (encoder, worker) and its outputs (sink): the recording and restream targets
(outputs, targets)."""
