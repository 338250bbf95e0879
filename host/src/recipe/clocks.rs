//! Recipes never wait on a clock. A WASI monotonic-clock subscription (what
//! `std::thread::sleep` and timers compile to on wasm32-wasip2) is ready at once
//! and its length is charged to the call's time budget: a recipe that sleeps
//! past `--recipe-timeout` is stopped at the next epoch tick, as a busy loop is,
//! instead of blocking inside the host where epoch interruption cannot reach.
//! Semantics of the interface: wasi:clocks/monotonic-clock in
//! wasmtime-wasi's `src/p2/wit/deps/clocks.wit`.

use std::time::Duration;

use wasmtime::StoreContextMut;
use wasmtime::component::Linker;
use wasmtime_wasi::p2::{Pollable, subscribe};

use super::runtime::State;

/// The interface as wasmtime-wasi defines it (guests importing any 0.2.x resolve to it).
const MONOTONIC_CLOCK: &str = "wasi:clocks/monotonic-clock@0.2.12";

/// A pollable that is always ready.
struct Ready;

#[wasmtime_wasi::async_trait]
impl Pollable for Ready {
    async fn ready(&mut self) {}
}

/// Replaces `subscribe-duration` and `subscribe-instant` of the WASI clocks
/// already in `linker` (wasmtime_wasi::p2::add_to_linker_sync).
pub(super) fn add_to_linker(linker: &mut Linker<State>) -> anyhow::Result<()> {
    linker.allow_shadowing(true);
    let mut clock = linker.instance(MONOTONIC_CLOCK)?;
    clock.func_wrap("subscribe-duration", |mut store: StoreContextMut<'_, State>, (nanos,): (u64,)| {
        let s = store.data_mut();
        s.slept = s.slept.saturating_add(Duration::from_nanos(nanos));
        // Past the budget: stopped here, as the epoch callback would at its next tick.
        if s.slept >= s.budget {
            return Err(wasmtime::Error::new(wasmtime::Trap::Interrupt));
        }
        let ready = s.table.push(Ready)?;
        Ok((subscribe(&mut s.table, ready)?,))
    })?;
    // An absolute instant: its distance is unknown here, so it is charged as
    // a wait past any budget (no recipe has a reason to wait for a moment).
    clock.func_wrap("subscribe-instant", |mut store: StoreContextMut<'_, State>, (_when,): (u64,)| {
        store.data_mut().slept = Duration::MAX;
        Err::<(wasmtime::component::Resource<wasmtime_wasi::p2::DynPollable>,), _>(wasmtime::Error::new(wasmtime::Trap::Interrupt))
    })?;
    linker.allow_shadowing(false);
    Ok(())
}
