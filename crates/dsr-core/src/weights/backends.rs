//! The `VarBuilder` backends the models are built through: detached copies for the frozen
//! discrete model, and a recorder that lists the tensors a configuration needs.

use std::sync::Mutex;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

use crate::{Error, Result};

/// A `VarBuilder` backend that hands out detached copies of another builder's tensors, so that
/// the layers built from it are constants for autograd (used for the frozen discrete model).
pub(crate) struct DetachedBackend<'a> {
    inner: VarBuilder<'a>,
}

impl<'a> DetachedBackend<'a> {
    pub(crate) fn new(inner: VarBuilder<'a>) -> Self {
        Self { inner }
    }
}

impl SimpleBackend for DetachedBackend<'_> {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.inner.get_with_hints_dtype(s, name, h, dtype)?;
        Ok(t.to_device(dev)?.detach())
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        Ok(self
            .inner
            .get_unchecked_dtype(name, dtype)?
            .to_device(dev)?
            .detach())
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
    }
}

/// A backend that records every requested (name, shape) and returns zero-copy zero tensors, to
/// list the tensors a configuration needs without allocating them.
struct ShapeRecorder {
    seen: Mutex<Vec<(String, Vec<usize>)>>,
}

impl SimpleBackend for ShapeRecorder {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.seen
            .lock()
            .map_err(|_| candle_core::Error::Msg("shape recorder poisoned".into()))?
            .push((name.to_string(), s.dims().to_vec()));
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(
        &self,
        name: &str,
        _dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        candle_core::bail!("shape recorder: {name} requested without a shape")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

/// The sorted `(name, shape)` of every tensor `build` asks for, without allocating any.
pub(crate) fn record_shapes(
    build: impl FnOnce(VarBuilder<'static>) -> Result<()>,
) -> Result<Vec<(String, Vec<usize>)>> {
    let recorder = std::sync::Arc::new(ShapeRecorder {
        seen: Mutex::new(Vec::new()),
    });
    struct Shared(std::sync::Arc<ShapeRecorder>);
    impl SimpleBackend for Shared {
        fn get(
            &self,
            s: Shape,
            name: &str,
            h: Init,
            dtype: DType,
            dev: &Device,
        ) -> candle_core::Result<Tensor> {
            self.0.get(s, name, h, dtype, dev)
        }
        fn get_unchecked(
            &self,
            name: &str,
            dtype: DType,
            dev: &Device,
        ) -> candle_core::Result<Tensor> {
            self.0.get_unchecked(name, dtype, dev)
        }
        fn contains_tensor(&self, name: &str) -> bool {
            self.0.contains_tensor(name)
        }
    }
    let vb = VarBuilder::from_backend(Box::new(Shared(recorder.clone())), DType::F32, Device::Cpu);
    build(vb)?;
    let mut seen = recorder
        .seen
        .lock()
        .map_err(|_| Error::Config("shape recorder poisoned".into()))?
        .clone();
    seen.sort();
    seen.dedup();
    Ok(seen)
}
