//! The one rule that tells a fixed window from a refilling budget by what answers say. The
//! replica's own governor (`bucket.rs`) applies it, and the fleet's budget script
//! (`fleet/tier/lua/budget.lua`) is given its thresholds with every answer it learns from.
//!
//! A refilling budget is whole again `1/rate` later for each request spent; a window ends
//! when it ends, whatever is spent. So answers of one budget period show a window when what
//! remains fell by at least [`MIN_FALL_SHARE`] of the limit (and at least [`MIN_FALL`], past
//! the headers' rounding) while the moment they say the budget is whole again moved less than
//! [`AGREEMENT`] of what a refill would have moved it: `fall × reset ÷ spent`, the latest
//! answer's reset spread over what it says was spent. Delays would have to differ by that
//! much to fool it: for OpenAI's per-minute budgets, a tenth of the limit is 6 s of refill.

/// The least fall of what remains, as a share of the limit, that can show a window.
pub(crate) const MIN_FALL_SHARE: f64 = 0.1;
/// The least fall of what remains that can show a window, whatever the limit.
pub(crate) const MIN_FALL: f64 = 2.0;
/// How closely the ends must agree, as a share of what a refill would have moved them.
pub(crate) const AGREEMENT: f64 = 0.25;

/// Whether answers of one period show a window: what remains fell by `fall` while the ends
/// they said moved by `moved_secs`; the latest answer said `remaining` of `limit`, whole
/// again in `reset_secs`.
pub(crate) fn shows_window(
    limit: f64,
    remaining: f64,
    reset_secs: f64,
    fall: f64,
    moved_secs: f64,
) -> bool {
    if fall < (limit * MIN_FALL_SHARE).max(MIN_FALL) {
        return false;
    }
    let refill_moves = fall * reset_secs / (limit - remaining).max(1.0);
    moved_secs < AGREEMENT * refill_moves
}
