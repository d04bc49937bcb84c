"""Per-key limits: requests and tokens per minute and requests at once, enforced by this
instance alone (:mod:`.local`) or by every instance together through Redis (:mod:`.shared`)."""
