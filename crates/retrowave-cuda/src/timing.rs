//! Timing GPU work with events on the backend's stream (never host clocks around async work).

use cudarc::driver::{CudaStream, sys};

use crate::CudaError;

/// Runs `f` `warmup` times, then `reps` times with events around each run, and returns the
/// per-run times in microseconds, sorted.
pub fn time_us(
    stream: &CudaStream,
    warmup: usize,
    reps: usize,
    mut f: impl FnMut() -> Result<(), CudaError>,
) -> Result<Vec<f64>, CudaError> {
    for _ in 0..warmup {
        f()?;
    }
    let mut events = Vec::with_capacity(reps + 1);
    for _ in 0..=reps {
        events.push(timing_event(stream)?);
    }
    events[0]
        .record(stream)
        .map_err(CudaError::driver("cuEventRecord"))?;
    for e in &events[1..] {
        f()?;
        e.record(stream)
            .map_err(CudaError::driver("cuEventRecord"))?;
    }
    stream
        .synchronize()
        .map_err(CudaError::driver("cuStreamSynchronize"))?;
    let mut out = Vec::with_capacity(reps);
    for w in events.windows(2) {
        let ms = w[0]
            .elapsed_ms(&w[1])
            .map_err(CudaError::driver("cuEventElapsedTime"))?;
        out.push(ms as f64 * 1000.0);
    }
    out.sort_by(f64::total_cmp);
    Ok(out)
}

/// Runs `f` `warmup` times, then `reps` times back to back between two events, and returns the
/// mean time per run in microseconds: nothing between the runs, as consecutive kernels of a
/// decode step run.
pub fn time_back_to_back_us(
    stream: &CudaStream,
    warmup: usize,
    reps: usize,
    mut f: impl FnMut() -> Result<(), CudaError>,
) -> Result<f64, CudaError> {
    for _ in 0..warmup {
        f()?;
    }
    let (start, end) = (timing_event(stream)?, timing_event(stream)?);
    start
        .record(stream)
        .map_err(CudaError::driver("cuEventRecord"))?;
    for _ in 0..reps {
        f()?;
    }
    end.record(stream)
        .map_err(CudaError::driver("cuEventRecord"))?;
    stream
        .synchronize()
        .map_err(CudaError::driver("cuStreamSynchronize"))?;
    let ms = start
        .elapsed_ms(&end)
        .map_err(CudaError::driver("cuEventElapsedTime"))?;
    Ok(ms as f64 * 1000.0 / reps.max(1) as f64)
}

/// A new event (with timing) in the stream's context.
fn timing_event(stream: &CudaStream) -> Result<cudarc::driver::CudaEvent, CudaError> {
    stream
        .context()
        .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
        .map_err(CudaError::driver("cuEventCreate"))
}

/// The median of sorted values.
pub fn median(sorted: &[f64]) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}
