//! The conditioning ComfyUI builds for the diffusion transformers from their text
//! encoders' outputs (`comfy/text_encoders/sd3_clip.py`, `flux.py`; `SPEC.md` section 6).
//!
//! SD3 / SD3.5 (`SD3ClipModel.encode_token_weights`):
//! - CLIP-L: `layer="hidden", layer_idx=-2`, no final norm on the hidden state
//!   (the penultimate layer, [`crate::models::clip::HfClip::encode`]), pooled =
//!   the final-normed end token *without* projection (`return_projected_pooled=False`);
//! - OpenCLIP-G (`SDXLClipG`): penultimate layer, no final norm; pooled through
//!   `text_projection` (`return_projected_pooled=True`);
//! - context: CLIP-L ‖ CLIP-G on the feature axis (both cut to the shorter token
//!   count), zero-padded to 4096 features (with CLIP-L missing, CLIP-G sits after
//!   768 zero features), then T5-XXL's tokens appended on the sequence axis; no
//!   CLIP at all: T5 alone; nothing at all: zeros `[B, 77, 4096]`. (4096, 768 and
//!   1280 are the real widths; [`TextWidths`] carries the model's, read from its
//!   weights, which tiny test models narrow.)
//! - pooled: CLIP-L pooled (768) ‖ CLIP-G pooled (1280), a missing one as zeros.
//!
//! FLUX.1 (`FluxClipModel`): context = T5-XXL's last hidden state (after its final
//! norm), pooled = CLIP-L's pooled output (final-normed end token, unprojected, of
//! the *last* layer). A missing encoder here is replaced by zeros of its shape
//! (T5: `[B, 256, 4096]`), as the issue asks for calibration without encoders.

use anyhow::{Result, bail, ensure};

use crate::nn::Ops;

/// Widths of the encoders' outputs a model takes (real: [`SD3_WIDTHS`], [`FLUX_WIDTHS`];
/// a model's own: [`crate::models::text::stack::TextFiles::widths`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TextWidths {
    pub clip_l: usize,
    /// OpenCLIP-G's hidden width and pooled width (both 1280); 0 for FLUX.
    pub clip_g: usize,
    /// T5's width = the context width.
    pub context: usize,
    /// Tokens of the all-zero context when no encoder is present (77 SD3, 256 FLUX).
    pub empty_tokens: usize,
}

pub const SD3_WIDTHS: TextWidths = TextWidths { clip_l: 768, clip_g: 1280, context: 4096, empty_tokens: 77 };
pub const FLUX_WIDTHS: TextWidths = TextWidths { clip_l: 768, clip_g: 0, context: 4096, empty_tokens: 256 };

/// One CLIP tower's outputs: hidden states `[B, N, width]`, pooled `[B, P]`.
#[derive(Clone, Debug)]
pub struct ClipOutput<T> {
    pub hidden: T,
    pub pooled: T,
}

/// What a diffusion transformer is conditioned on.
#[derive(Clone, Debug)]
pub struct DitConditioning<T> {
    /// `[B, tokens, context]`.
    pub context: T,
    /// `[B, pooled]`: 2048 for SD3, 768 for FLUX.
    pub pooled: T,
}

fn zeros<O: Ops>(ops: &O, shape: &[usize]) -> Result<O::Tensor> {
    ops.from_f32(shape, &vec![0.0; shape.iter().product()])
}

fn expect<O: Ops>(ops: &O, t: &O::Tensor, what: &str, batch: usize, last: usize) -> Result<()> {
    let s = ops.shape(t);
    ensure!(s.first() == Some(&batch) && s.last() == Some(&last), "{what} has shape {s:?}, expected [{batch}, .., {last}]");
    Ok(())
}

/// SD3 / SD3.5 conditioning for `batch` prompts.
pub fn sd3<O: Ops>(
    ops: &O,
    batch: usize,
    widths: TextWidths,
    clip_l: Option<&ClipOutput<O::Tensor>>,
    clip_g: Option<&ClipOutput<O::Tensor>>,
    t5: Option<&O::Tensor>,
) -> Result<DitConditioning<O::Tensor>> {
    let w = widths;
    ensure!(w.clip_l + w.clip_g <= w.context, "CLIP widths {} + {} exceed the context width {}", w.clip_l, w.clip_g, w.context);
    if let Some(l) = clip_l {
        expect(ops, &l.hidden, "CLIP-L's hidden state", batch, w.clip_l)?;
        expect(ops, &l.pooled, "CLIP-L's pooled output", batch, w.clip_l)?;
    }
    if let Some(g) = clip_g {
        expect(ops, &g.hidden, "OpenCLIP-G's hidden state", batch, w.clip_g)?;
        expect(ops, &g.pooled, "OpenCLIP-G's pooled output", batch, w.clip_g)?;
    }
    if let Some(t) = t5 {
        expect(ops, t, "T5's hidden state", batch, w.context)?;
    }
    let lg = match (clip_l, clip_g) {
        (Some(l), Some(g)) => {
            let cut = ops.shape(&l.hidden)[1].min(ops.shape(&g.hidden)[1]);
            let (l, g) = (ops.narrow(&l.hidden, 1, 0, cut)?, ops.narrow(&g.hidden, 1, 0, cut)?);
            Some(ops.concat(&[&l, &g], 2)?)
        }
        (Some(l), None) => Some(l.hidden.clone()),
        (None, Some(g)) => {
            let n = ops.shape(&g.hidden)[1];
            Some(ops.concat(&[&zeros(ops, &[batch, n, w.clip_l])?, &g.hidden], 2)?)
        }
        (None, None) => None,
    };
    let lg = match lg {
        Some(lg) => {
            let s = ops.shape(&lg);
            let pad = w.context - s[2];
            Some(if pad == 0 { lg } else { ops.concat(&[&lg, &zeros(ops, &[batch, s[1], pad])?], 2)? })
        }
        None => None,
    };
    let context = match (lg, t5) {
        (Some(lg), Some(t)) => ops.concat(&[&lg, t], 1)?,
        (Some(lg), None) => lg,
        (None, Some(t)) => t.clone(),
        (None, None) => zeros(ops, &[batch, w.empty_tokens, w.context])?,
    };
    let l_pooled = match clip_l {
        Some(l) => l.pooled.clone(),
        None => zeros(ops, &[batch, w.clip_l])?,
    };
    let g_pooled = match clip_g {
        Some(g) => g.pooled.clone(),
        None => zeros(ops, &[batch, w.clip_g])?,
    };
    let pooled = ops.concat(&[&l_pooled, &g_pooled], 1)?;
    Ok(DitConditioning { context, pooled })
}

/// FLUX.1 conditioning for `batch` prompts from CLIP-L's pooled output and T5's hidden state.
pub fn flux<O: Ops>(
    ops: &O,
    batch: usize,
    widths: TextWidths,
    clip_l_pooled: Option<&O::Tensor>,
    t5: Option<&O::Tensor>,
) -> Result<DitConditioning<O::Tensor>> {
    let w = widths;
    if w.clip_g != 0 {
        bail!("FLUX takes no OpenCLIP-G");
    }
    let context = match t5 {
        Some(t) => {
            expect(ops, t, "T5's hidden state", batch, w.context)?;
            t.clone()
        }
        None => zeros(ops, &[batch, w.empty_tokens, w.context])?,
    };
    let pooled = match clip_l_pooled {
        Some(p) => {
            expect(ops, p, "CLIP-L's pooled output", batch, w.clip_l)?;
            p.clone()
        }
        None => zeros(ops, &[batch, w.clip_l])?,
    };
    Ok(DitConditioning { context, pooled })
}

#[cfg(test)]
#[path = "conditioning_tests.rs"]
mod tests;
