"""Table over runs (placeholder until implemented)."""


def main(args) -> int:
    raise ValueError("kerasfrac report is not implemented yet")
