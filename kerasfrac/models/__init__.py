"""Models: registered architectures, their heads and layers, and save/load conversion.

``build_model(cfg.model, input_shape)`` builds a registered architecture; the output and
layer names that evaluation and explanations read are the constants below.
"""

from kerasfrac.models.model import (  # noqa: F401
    BOX_HEATMAP,
    BOX_LOGITS,
    FEATURES,
    LOGIT,
    META_LOGITS,
    MODELS,
    PROB,
    FusedBatchNormalization,
    application,
    block_output_names,
    box_model,
    build_model,
    classifier,
    conv_layer_names,
    float32_compute,
    functional,
    has_box_head,
    has_meta_head,
    last_conv_block_name,
    load_model,
    logit_layer_name,
    output_index,
    paper_cnn,
    plain_keras,
    predict_probs,
    resnet_small,
    uses_fused_batchnorm,
    uses_mixed_precision,
    vgg16,
)
