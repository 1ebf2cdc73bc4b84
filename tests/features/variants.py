"""Norm, residual, layout and feed-forward variants from upstream (issue 21)."""

from harness import register

# A feature that closes every branch at init (LayerScale at 0, zero output projections) leaves
# without a gradient at init everything read only through a branch: inside the stacks, anything
# may be zero at init (the harness still requires every gradient non-zero after optimizer steps)
BRANCHES = ("attn_layers.", "encoder.", "memory_tokens")
# what a closed branch (ReZero's gate, LayerScale at 0) leaves without gradient in each feature here

register("dynamic_tanh", layers=dict(use_dynamic_tanh=True, dynamic_tanh_init_alpha=1.5), group="norm")
register("derf", layers=dict(use_derf=True), group="norm")
register("pre_and_post_norm", layers=dict(pre_and_post_norm=True), group="placement")
register("layerscale", layers=dict(use_layerscale=True), zero_init=BRANCHES)
register("layerscale_init", layers=dict(use_layerscale=True, layerscale_init_value=0.1), zero_init=("layerscale",))
register("softclamp_output", layers=dict(softclamp_output=True, softclamp_output_value=2.0))
register("gate_residual", layers=dict(gate_residual=True), zero_init=("gru.",))
register("scale_residual", layers=dict(scale_residual=True, scale_residual_constant=0.7), zero_init=("skip_scale",))
register("scale_residual_branch", layers=dict(scale_residual=0.5))
register("depth_scale_residual", layers=dict(depth_scale_residual=True))
register("zero_init_branch_output", layers=dict(zero_init_branch_output=True), zero_init=BRANCHES)
register("reinject_input", layers=dict(reinject_input=True, learned_reinject_input_gate=True),
         zero_init=("reinject",))
register("weight_tie_layers", layers=dict(weight_tie_layers=True))
# runs the first unit twice, then the second (depth 2: blocks a f a f)
register("layers_execute_order", layers=dict(layers_execute_order=(0, 1, 0, 1, 2, 3)))
register("only_attn", layers=dict(only_attn=True), group="layout")
register("ff_solu", layers=dict(ff_solu=True))
register("ff_post_act_ln", layers=dict(ff_post_act_ln=True))
register("ff_glu_mult_bias", layers=dict(ff_glu=True, ff_glu_mult_bias=True))
register("ff_glu_softclamp", layers=dict(ff_glu=True, ff_activation="swish", ff_glu_softclamp=True,
                                         ff_glu_gate_softclamp_value=2.0, ff_glu_up_softclamp_value=3.0))
register("ff_softclamp", layers=dict(ff_softclamp_value=1.0))
register("ff_output_proj_depth", layers=dict(ff_output_proj_depth=3))
register("ff_sublayer_dropout", layers=dict(ff_sublayer_dropout=0.1))
register("rotary_pi_ntk", layers=dict(rotary_pos_emb=True, rotary_interpolation_factor=2.0,
                                      rotary_base_rescale_factor=4.0), group="relpos")
register("dynamic_pos_bias", layers=dict(dynamic_pos_bias=True, dynamic_pos_bias_log_distance=True,
                                         dynamic_pos_bias_norm=True, dynamic_pos_bias_mlp_depth=2), group="relpos")
# (the dynamic weights start at zero: their scale and the streams' norm get gradients after one step)
register("hyper_connections", layers=dict(num_residual_streams=3, hyper_conn_sinkhorn_iters=4),
         zero_init=("dynamic_", "static_", ".norm.weight", "stream_emb"))
register("unet_skips", layers=dict(unet_skips=True), kinds=("decoder", "encoder", "cross", "encdec"),
         zero_init=("unet.",))
register("par_ratio", layers=dict(par_ratio=2), group="layout", kinds=("decoder", "encoder", "cross", "funnel"))
register("shift_tokens", layers=dict(shift_tokens=1), cacheable=False)
register("cross_attn_tokens_dropout", layers=dict(cross_attn_tokens_dropout=0.25), kinds=("cross",))
# RealFormer's score carries (residual_attn, cross_residual_attn) and xPos: causal-only (xPos) or
# kept to the kinds that exercise them, to keep the pairwise rows few
register("residual_attn", layers=dict(residual_attn=True, cross_residual_attn=True), kinds=("decoder",))
register("rotary_xpos", layers=dict(rotary_xpos=True, rotary_xpos_scale_base=16), group="relpos", kinds=("decoder",))
register("orthog_residual", layers=dict(orthog_residual=True), kinds=("decoder",))
# (the learned gains read the update's mean: zero while ReZero's gate closes the branch)
register("mv_split_residual", layers=dict(mv_split_residual=True, residual_fn_kwargs=dict(learned=True)),
         kinds=("encoder",), zero_init=("update.",))
register("polar_pos_emb", layers=dict(polar_pos_emb=True, polar_bias_uniform_init=True), kinds=("decoder",))
# (the bottleneck and its scale reach the output only through the read / write gates, zero at init)
register("gated_multi_residual", layers=dict(gated_multi_residual=True, num_residual_streams=2,
                                             residual_fn_kwargs=dict(read_gate_rank=2)), kinds=("decoder",),
         zero_init=("to_bottleneck", "dynamic_scale"))
# LIMe (2502.09245): every branch reads a learned mix of the earlier blocks' inputs; its self-attentions after
# the first read three mixtures (q, k, v)
register("integrate_layers", layers=dict(integrate_layers=True))
# (not its ReLU router: a router whose logits are negative on every token closes its block, gradients and
# all, which the harness's gradient property would report; tests/test_layer_integration.py checks it)
# hyper-connections whose self-attentions read q, k and v from three mixtures of the streams
register("qkv_diff_residuals", layers=dict(num_residual_streams=2, qkv_receive_diff_residuals=True),
         kinds=("decoder", "encoder", "encdec"), zero_init=("dynamic_", "static_", ".norm.weight", "stream_emb"))
# aggregated residuals: attention over the earlier blocks' inputs (its query's low-rank down projection and
# the norm before it reach the output only through the up projection, zero at init)
register("attn_aggregated_residuals", layers=dict(attn_aggregated_residuals=True,
                                                  attn_aggregated_residual_kwargs=dict(lora_rank=4)),
         zero_init=("integrate.down", "integrate.query_in_norm"),
         # (not encdec: under ReZero its encoder's query path is a chain of four zero-initialised links, the
         # decoder's cross gates, the encoder's gates, the up and the down projections: past the three steps
         # the gradient property allows; decoder and encoder stacks cover it)
         kinds=("decoder", "encoder", "cross", "funnel"))
