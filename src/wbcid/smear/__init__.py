"""Whole smear fields: find every WBC (:mod:`.detect`) and count them (:mod:`.counting`)."""
