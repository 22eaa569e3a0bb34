"""Apply a saved model to new images (placeholder until implemented)."""


def main(args) -> int:
    raise ValueError("kerasfrac predict is not implemented yet")
