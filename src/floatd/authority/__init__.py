"""The reference central authority (`floatd-authority`): the vendor side."""
