//! `rnnkit._core`: the one place where Python meets the kernels. Arguments are checked here
//! (shape, dtype, contiguity), NumPy buffers are read in place, the GIL is released while the
//! kernels run, and [`Error`] becomes a Python exception.

use crate::cells::CellKind;
use crate::error::Error;
use crate::gemm::{matmul, Mat, MatMut};
use crate::simd::Float;
use crate::sweep::{self, Dims, Grads, Layer, Layout, Tape, WeightCache, Weights};
use numpy::{
    Element, PyArray2, PyArray3, PyArrayDescrMethods, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn,
    PyReadwriteArrayDyn, PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyList, PyTuple};
use std::sync::Mutex;

impl From<Error> for PyErr {
    fn from(e: Error) -> PyErr {
        match e {
            Error::DType(m) => PyTypeError::new_err(m),
            Error::Shape(m) | Error::Value(m) => PyValueError::new_err(m),
        }
    }
}

fn value_err(msg: String) -> PyErr {
    PyValueError::new_err(msg)
}

/// Borrow `obj` (argument `name`) as a C-contiguous read-only array of `T` with `ndim` dims.
fn readonly<'py, T: Element>(obj: &Bound<'py, PyAny>, name: &str, ndim: usize) -> PyResult<PyReadonlyArrayDyn<'py, T>> {
    let arr = obj
        .cast::<PyUntypedArray>()
        .map_err(|_| PyTypeError::new_err(format!("{name} must be a numpy array; got {}", type_name(obj))))?;
    let dt = arr.dtype();
    let want = numpy::dtype::<T>(obj.py());
    if !dt.is_equiv_to(&want) {
        return Err(PyTypeError::new_err(format!(
            "{name} must have dtype {}; got {}",
            want, dt
        )));
    }
    if arr.ndim() != ndim {
        return Err(value_err(format!(
            "{name} must be {ndim}-dimensional; got shape {:?}",
            arr.shape()
        )));
    }
    if !arr.is_c_contiguous() {
        return Err(value_err(format!(
            "{name} must be C-contiguous (use numpy.ascontiguousarray)"
        )));
    }
    let typed = obj.cast::<PyArrayDyn<T>>()?;
    typed.try_readonly().map_err(|e| value_err(format!("{name}: {e}")))
}

fn readwrite<'py, T: Element>(
    obj: &Bound<'py, PyAny>,
    name: &str,
    ndim: usize,
) -> PyResult<PyReadwriteArrayDyn<'py, T>> {
    readonly::<T>(obj, name, ndim)?;
    let typed = obj.cast::<PyArrayDyn<T>>()?;
    typed
        .try_readwrite()
        .map_err(|e| value_err(format!("{name} cannot be written (read-only or passed twice): {e}")))
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".into())
}

fn opt<'py, T: Element>(
    obj: Option<&Bound<'py, PyAny>>,
    name: &str,
    ndim: usize,
) -> PyResult<Option<PyReadonlyArrayDyn<'py, T>>> {
    match obj {
        Some(o) if !o.is_none() => Ok(Some(readonly::<T>(o, name, ndim)?)),
        _ => Ok(None),
    }
}

fn slice<'a, T: Element>(a: &'a PyReadonlyArrayDyn<'_, T>) -> &'a [T] {
    a.as_slice().expect("checked C-contiguous")
}

fn parse_cell(name: &str) -> PyResult<CellKind> {
    CellKind::parse(name).ok_or_else(|| {
        value_err(format!(
            "cell must be one of 'rnn_tanh', 'rnn_relu', 'lstm', 'gru'; got {name:?}"
        ))
    })
}

/// Per direction: (weight_ih, weight_hh, bias_ih, bias_hh) as read-only borrows.
type Borrowed<'py, T> = Vec<[PyReadonlyArrayDyn<'py, T>; 4]>;

const PARAM_NAMES: [&str; 4] = ["weight_ih", "weight_hh", "bias_ih", "bias_hh"];

/// The 4-tuples `(weight_ih, weight_hh, bias_ih, bias_hh)` of the list `obj` (argument `name`),
/// each array passed through `borrow(array, "name[d].param", ndim)`.
fn param_tuples<'py, B>(
    obj: &Bound<'py, PyAny>,
    name: &str,
    borrow: impl Fn(&Bound<'py, PyAny>, &dyn Fn() -> String, usize) -> PyResult<B>,
) -> PyResult<Vec<[B; 4]>> {
    let list = obj.cast::<PyList>().map_err(|_| {
        PyTypeError::new_err(format!(
            "{name} must be a list of 4-tuples (weight_ih, weight_hh, bias_ih, bias_hh) of arrays"
        ))
    })?;
    let mut out = Vec::with_capacity(list.len());
    for (d, item) in list.iter().enumerate() {
        let t = item.cast::<PyTuple>().map_err(|_| {
            PyTypeError::new_err(format!(
                "{name}[{d}] must be a tuple (weight_ih, weight_hh, bias_ih, bias_hh)"
            ))
        })?;
        if t.len() != 4 {
            return Err(value_err(format!("{name}[{d}] must have 4 arrays; got {}", t.len())));
        }
        let mut arrs = Vec::with_capacity(4);
        for (k, pname) in PARAM_NAMES.iter().enumerate() {
            arrs.push(borrow(
                &t.get_item(k)?,
                &|| format!("{name}[{d}].{pname}"),
                if k < 2 { 2 } else { 1 },
            )?);
        }
        out.push(arrs.try_into().map_err(|_| value_err("unreachable".into()))?);
    }
    Ok(out)
}

fn borrow_params<'py, T: Element>(list: &Bound<'py, PyAny>, name: &str) -> PyResult<Borrowed<'py, T>> {
    param_tuples(list, name, |a, n, nd| readonly::<T>(a, &n(), nd))
}

fn weights_of<'a, T: Element>(b: &'a Borrowed<'_, T>) -> Vec<Weights<'a, T>> {
    b.iter()
        .map(|[a, bb, c, d]| Weights {
            w_ih: slice(a),
            w_hh: slice(bb),
            b_ih: slice(c),
            b_hh: slice(d),
        })
        .collect()
}

fn layer_of(cell: CellKind, shape: &[usize], batch_first: bool, hidden: usize, directions: usize) -> Layer {
    let (batch, seq_len) = if batch_first {
        (shape[0], shape[1])
    } else {
        (shape[1], shape[0])
    };
    Layer {
        cell,
        dims: Dims {
            seq_len,
            batch,
            input: shape[2],
            hidden,
        },
        layout: if batch_first {
            Layout::BatchFirst
        } else {
            Layout::TimeMajor
        },
        directions,
    }
}

fn parse_lengths(obj: Option<&Bound<'_, PyAny>>) -> PyResult<Option<Vec<usize>>> {
    let Some(obj) = obj.filter(|o| !o.is_none()) else {
        return Ok(None);
    };
    let arr = readonly::<i64>(obj, "lengths", 1)?;
    slice(&arr)
        .iter()
        .enumerate()
        .map(|(b, &v)| {
            usize::try_from(v).map_err(|_| {
                value_err(format!(
                    "lengths[{b}] = {v} is out of range; every length must be at least 1"
                ))
            })
        })
        .collect::<PyResult<Vec<_>>>()
        .map(Some)
}

enum AnyTape {
    F32(Tape<f32>),
    F64(Tape<f64>),
}

/// What a training forward kept for backward (opaque). `backward` consumes it.
#[pyclass(module = "rnnkit._core", name = "Tape", frozen)]
pub struct PyTape {
    inner: Mutex<Option<AnyTape>>,
    dtype: &'static str,
}

#[pymethods]
impl PyTape {
    /// Whether backward has not been run on this tape yet.
    #[getter]
    fn pending(&self) -> bool {
        self.inner.try_lock().map(|t| t.is_some()).unwrap_or(true)
    }
    fn __repr__(&self) -> String {
        format!(
            "<rnnkit Tape {} {}>",
            self.dtype,
            if self.pending() { "pending" } else { "used" }
        )
    }

    /// Raise ValueError unless `weights` are the parameters the forward pass used.
    fn check_weights(&self, weights: &Bound<'_, PyAny>) -> PyResult<()> {
        let guard = self
            .inner
            .try_lock()
            .map_err(|_| value_err("this tape is in use by another backward call".into()))?;
        match guard.as_ref() {
            Some(AnyTape::F32(t)) => t.check_weights(&weights_of(&borrow_params::<f32>(weights, "weights")?), 1)?,
            Some(AnyTape::F64(t)) => t.check_weights(&weights_of(&borrow_params::<f64>(weights, "weights")?), 1)?,
            None => return Err(value_err("backward was already run for this forward".into())),
        }
        Ok(())
    }
}

enum AnyCache {
    F32(WeightCache<f32>),
    F64(WeightCache<f64>),
}

/// One recurrent layer's weights prepared for the kernels (the recurrent weights packed) and kept
/// from one inference `forward` to the next. Each call compares the weights it is given with the
/// copy it holds, bit for bit, and prepares them again when they changed. Copying or pickling
/// gives an empty cache.
#[pyclass(module = "rnnkit._core", name = "WeightCache", frozen)]
pub struct PyWeightCache {
    inner: Mutex<Option<AnyCache>>,
}

impl PyWeightCache {
    /// `f` on the cache, waiting without the GIL for a call that uses it (which needs the GIL to
    /// return).
    fn with<R: Send>(&self, py: Python<'_>, f: impl FnOnce(&mut Option<AnyCache>) -> R + Send) -> R {
        py.detach(|| f(&mut self.inner.lock().unwrap_or_else(|e| e.into_inner())))
    }
}

#[pymethods]
impl PyWeightCache {
    #[new]
    fn new() -> Self {
        PyWeightCache {
            inner: Mutex::new(None),
        }
    }
    /// How many times the weights were prepared: once, then once per change of the weights.
    #[getter]
    fn builds(&self, py: Python<'_>) -> usize {
        self.with(py, |c| match c {
            Some(AnyCache::F32(c)) => c.builds(),
            Some(AnyCache::F64(c)) => c.builds(),
            None => 0,
        })
    }
    /// Bytes held (the weights' copy and what was prepared from it).
    #[getter]
    fn nbytes(&self, py: Python<'_>) -> usize {
        self.with(py, |c| match c {
            Some(AnyCache::F32(c)) => c.nbytes(),
            Some(AnyCache::F64(c)) => c.nbytes(),
            None => 0,
        })
    }
    /// Free what is held.
    fn clear(&self, py: Python<'_>) {
        self.with(py, |c| *c = None);
    }
    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> (Bound<'py, pyo3::types::PyType>, ()) {
        (slf.get_type(), ())
    }
    fn __repr__(&self, py: Python<'_>) -> String {
        format!(
            "<rnnkit WeightCache: {} bytes, {} builds>",
            self.nbytes(py),
            self.builds(py)
        )
    }
}

type ForwardOut<'py> = (
    Bound<'py, PyAny>,
    Bound<'py, PyAny>,
    Option<Bound<'py, PyAny>>,
    Option<Py<PyTape>>,
);

trait Wrap: Float + Element {
    fn wrap(t: Tape<Self>) -> AnyTape;
    fn peek(t: &AnyTape) -> Option<&Tape<Self>>;
    /// The cache of this element type in `slot`, replacing one of the other type.
    fn cache(slot: &mut Option<AnyCache>) -> &mut WeightCache<Self>;
}
macro_rules! wrap {
    ($t:ty, $mine:ident) => {
        impl Wrap for $t {
            fn wrap(t: Tape<$t>) -> AnyTape {
                AnyTape::$mine(t)
            }
            fn peek(t: &AnyTape) -> Option<&Tape<$t>> {
                match t {
                    AnyTape::$mine(t) => Some(t),
                    _ => None,
                }
            }
            fn cache(slot: &mut Option<AnyCache>) -> &mut WeightCache<$t> {
                if !matches!(slot, Some(AnyCache::$mine(_))) {
                    *slot = Some(AnyCache::$mine(WeightCache::default()));
                }
                match slot {
                    Some(AnyCache::$mine(c)) => c,
                    _ => unreachable!("just set"),
                }
            }
        }
    };
}
wrap!(f32, F32);
wrap!(f64, F64);

fn float_kind(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<&'static str> {
    let arr = obj
        .cast::<PyUntypedArray>()
        .map_err(|_| PyTypeError::new_err(format!("{name} must be a numpy array; got {}", type_name(obj))))?;
    let dt = arr.dtype();
    if dt.is_equiv_to(&numpy::dtype::<f32>(obj.py())) {
        Ok("float32")
    } else if dt.is_equiv_to(&numpy::dtype::<f64>(obj.py())) {
        Ok("float64")
    } else {
        Err(PyTypeError::new_err(format!(
            "{name} must have dtype float32 or float64; got {dt}"
        )))
    }
}

#[allow(clippy::too_many_arguments)]
fn forward_t<'py, T: Wrap>(
    py: Python<'py>,
    cell: CellKind,
    x: &Bound<'py, PyAny>,
    weights: &Bound<'py, PyAny>,
    h0: Option<&Bound<'py, PyAny>>,
    c0: Option<&Bound<'py, PyAny>>,
    lengths: Option<&Bound<'py, PyAny>>,
    batch_first: bool,
    train: bool,
    cache: Option<&PyWeightCache>,
) -> PyResult<ForwardOut<'py>> {
    let xa = readonly::<T>(x, "x", 3)?;
    let params = borrow_params::<T>(weights, "weights")?;
    let nd = params.len();
    if nd != 1 && nd != 2 {
        return Err(value_err(format!("weights must hold 1 or 2 directions; got {nd}")));
    }
    let whh = params[0][1].shape();
    let hidden = whh[0] / cell.gates();
    if whh[0] % cell.gates() != 0 || whh[1] != hidden {
        return Err(value_err(format!(
            "weights[0].weight_hh must have shape ({g}*hidden_size, hidden_size) for {}; got {:?}",
            cell.name(),
            whh,
            g = cell.gates()
        )));
    }
    let layer = layer_of(cell, xa.shape(), batch_first, hidden, nd);
    let h0a = opt::<T>(h0, "h0", 3)?;
    let c0a = opt::<T>(c0, "c0", 3)?;
    let lens = parse_lengths(lengths)?;
    let d = layer.dims;
    let yshape = if batch_first {
        [d.batch, d.seq_len, nd * d.hidden]
    } else {
        [d.seq_len, d.batch, nd * d.hidden]
    };
    // SAFETY: the sweep writes every element of y (zeros past a sequence's length).
    let y = unsafe { PyArray3::<T>::new(py, yshape, false) };
    let hn = PyArray3::<T>::zeros(py, [nd, d.batch, d.hidden], false);
    let cn = cell
        .has_c()
        .then(|| PyArray3::<T>::zeros(py, [nd, d.batch, d.hidden], false));
    let tape = {
        let mut yw = y.readwrite();
        let mut hw = hn.readwrite();
        let mut cw = cn.as_ref().map(|c| c.readwrite());
        let (ys, hs) = (
            yw.as_slice_mut().expect("new array"),
            hw.as_slice_mut().expect("new array"),
        );
        let cs: &mut [T] = match cw.as_mut() {
            Some(c) => c.as_slice_mut().expect("new array"),
            None => &mut [],
        };
        let w = weights_of(&params);
        let (xs, h0s, c0s) = (slice(&xa), h0a.as_ref().map(slice), c0a.as_ref().map(slice));
        // A cache in use by another thread's call is left to it: this call prepares its own.
        let mut guard = match cache.map(|c| c.inner.try_lock()) {
            Some(Ok(g)) => Some(g),
            Some(Err(std::sync::TryLockError::Poisoned(e))) => Some(e.into_inner()),
            Some(Err(std::sync::TryLockError::WouldBlock)) | None => None,
        };
        let wc = guard.as_deref_mut().map(T::cache);
        py.detach(|| sweep::forward(&layer, xs, &w, h0s, c0s, lens.as_deref(), ys, hs, cs, train, wc))?
    };
    let tape = match tape {
        Some(t) => Some(Py::new(
            py,
            PyTape {
                inner: Mutex::new(Some(T::wrap(t))),
                dtype: T::NAME,
            },
        )?),
        None => None,
    };
    Ok((y.into_any(), hn.into_any(), cn.map(|c| c.into_any()), tape))
}

/// Run one recurrent layer (one or two directions) over a batch of sequences.
///
/// Returns `(y, hn, cn, tape)`: `cn` is None unless `cell == "lstm"`, `tape` None unless `train`.
/// `cache` (inference only): a `WeightCache` that keeps this layer's prepared weights between
/// calls.
#[pyfunction]
#[pyo3(signature = (cell, x, weights, h0=None, c0=None, lengths=None, batch_first=true, train=false, cache=None))]
#[allow(clippy::too_many_arguments)]
fn forward<'py>(
    py: Python<'py>,
    cell: &str,
    x: &Bound<'py, PyAny>,
    weights: &Bound<'py, PyAny>,
    h0: Option<&Bound<'py, PyAny>>,
    c0: Option<&Bound<'py, PyAny>>,
    lengths: Option<&Bound<'py, PyAny>>,
    batch_first: bool,
    train: bool,
    cache: Option<&Bound<'py, PyAny>>,
) -> PyResult<ForwardOut<'py>> {
    let cell = parse_cell(cell)?;
    let cache =
        match cache {
            Some(c) => Some(c.cast::<PyWeightCache>().map_err(|_| {
                PyTypeError::new_err(format!("cache must be a WeightCache or None; got {}", type_name(c)))
            })?),
            None => None,
        };
    let cache = cache.map(|c| c.get());
    match float_kind(x, "x")? {
        "float32" => forward_t::<f32>(py, cell, x, weights, h0, c0, lengths, batch_first, train, cache),
        _ => forward_t::<f64>(py, cell, x, weights, h0, c0, lengths, batch_first, train, cache),
    }
}

type BackwardOut<'py> = (Bound<'py, PyAny>, Bound<'py, PyAny>, Option<Bound<'py, PyAny>>);

#[allow(clippy::too_many_arguments)]
fn backward_t<'py, T: Wrap>(
    py: Python<'py>,
    tape: &PyTape,
    weights: &Bound<'py, PyAny>,
    dy: &Bound<'py, PyAny>,
    dhn: Option<&Bound<'py, PyAny>>,
    dcn: Option<&Bound<'py, PyAny>>,
    grads: &Bound<'py, PyAny>,
    dh_out: Option<&Bound<'py, PyAny>>,
) -> PyResult<BackwardOut<'py>> {
    let params = borrow_params::<T>(weights, "weights")?;
    let dya = readonly::<T>(dy, "dy", 3)?;
    let dhna = opt::<T>(dhn, "dhn", 3)?;
    let dcna = opt::<T>(dcn, "dcn", 3)?;
    let mut gbufs = param_tuples(grads, "grads", |a, n, nd| readwrite::<T>(a, &n(), nd))?;
    let mut dh_outa = match dh_out {
        Some(o) if !o.is_none() => Some(readwrite::<T>(o, "dh_out", 3)?),
        _ => None,
    };
    // The tape is used up only when backward succeeds, so that a rejected call can be retried.
    // try_lock: a second thread must not wait for the lock while holding the GIL.
    let mut guard = tape
        .inner
        .try_lock()
        .map_err(|_| value_err("this tape is in use by another backward call".into()))?;
    let any = guard
        .as_ref()
        .ok_or_else(|| value_err("backward was already run for this forward; run a training forward again".into()))?;
    let typed = T::peek(any)
        .ok_or_else(|| PyTypeError::new_err(format!("dy must have the dtype of the forward pass ({})", tape.dtype)))?;
    let layer = *typed.layer();
    let d = layer.dims;
    let nd = layer.directions;
    let want = if layer.layout == Layout::BatchFirst {
        [d.batch, d.seq_len, nd * d.hidden]
    } else {
        [d.seq_len, d.batch, nd * d.hidden]
    };
    if dya.shape() != want {
        return Err(value_err(format!(
            "dy must have shape {:?} (the shape of y); got {:?}",
            want,
            dya.shape()
        )));
    }
    if let Some(a) = &dh_outa {
        if a.shape() != want {
            return Err(value_err(format!(
                "dh_out must have shape {:?} (the shape of y); got {:?}",
                want,
                a.shape()
            )));
        }
    }
    for (name, a) in [("dhn", &dhna), ("dcn", &dcna)] {
        if let Some(a) = a {
            if a.shape() != [nd, d.batch, d.hidden] {
                return Err(value_err(format!(
                    "{name} must have shape {:?}; got {:?}",
                    [nd, d.batch, d.hidden],
                    a.shape()
                )));
            }
        }
    }
    let xshape = if layer.layout == Layout::BatchFirst {
        [d.batch, d.seq_len, d.input]
    } else {
        [d.seq_len, d.batch, d.input]
    };
    // SAFETY: the backward sweep writes every element of dx (zeros past a sequence's length).
    let dx = unsafe { PyArray3::<T>::new(py, xshape, false) };
    let dh0 = PyArray3::<T>::zeros(py, [nd, d.batch, d.hidden], false);
    let dc0 = layer
        .cell
        .has_c()
        .then(|| PyArray3::<T>::zeros(py, [nd, d.batch, d.hidden], false));
    {
        let mut dxw = dx.readwrite();
        let mut dhw = dh0.readwrite();
        let mut dcw = dc0.as_ref().map(|c| c.readwrite());
        let dcs: &mut [T] = match dcw.as_mut() {
            Some(c) => c.as_slice_mut().expect("new array"),
            None => &mut [],
        };
        let mut gs: Vec<Grads<'_, T>> = gbufs
            .iter_mut()
            .map(|arrs| {
                let [a, b, c, e] = arrs;
                Grads {
                    w_ih: a.as_slice_mut().expect("checked"),
                    w_hh: b.as_slice_mut().expect("checked"),
                    b_ih: c.as_slice_mut().expect("checked"),
                    b_hh: e.as_slice_mut().expect("checked"),
                }
            })
            .collect();
        let w = weights_of(&params);
        let (dys, dhns, dcns) = (slice(&dya), dhna.as_ref().map(slice), dcna.as_ref().map(slice));
        let (dxs, dhs) = (
            dxw.as_slice_mut().expect("new array"),
            dhw.as_slice_mut().expect("new array"),
        );
        let dh_seq = dh_outa.as_mut().map(|a| a.as_slice_mut().expect("checked"));
        py.detach(|| sweep::backward(typed, &w, dys, dhns, dcns, dxs, dhs, dcs, &mut gs, dh_seq))?;
    }
    *guard = None;
    Ok((dx.into_any(), dh0.into_any(), dc0.map(|c| c.into_any())))
}

/// Backpropagate through the layer recorded in `tape` (consumed).
///
/// `grads` (one 4-tuple per direction, shaped like the weights) are added to in place.
/// If `dh_out` (shaped like y) is given, it receives dL/dh_t at every step.
/// Returns `(dx, dh0, dc0)`; `dc0` is None unless the layer is an LSTM.
#[pyfunction]
#[pyo3(signature = (tape, weights, dy, dhn=None, dcn=None, *, grads, dh_out=None))]
#[allow(clippy::too_many_arguments)] // the Python signature
fn backward<'py>(
    py: Python<'py>,
    tape: &Bound<'py, PyTape>,
    weights: &Bound<'py, PyAny>,
    dy: &Bound<'py, PyAny>,
    dhn: Option<&Bound<'py, PyAny>>,
    dcn: Option<&Bound<'py, PyAny>>,
    grads: &Bound<'py, PyAny>,
    dh_out: Option<&Bound<'py, PyAny>>,
) -> PyResult<BackwardOut<'py>> {
    let t = tape.get();
    match t.dtype {
        "float32" => backward_t::<f32>(py, t, weights, dy, dhn, dcn, grads, dh_out),
        _ => backward_t::<f64>(py, t, weights, dy, dhn, dcn, grads, dh_out),
    }
}

/// Borrow `obj` as a contiguous slice of `T` without NumPy's dynamic borrow tracking (which costs
/// more than a small step itself). The slices are only read, and the arrays they view are kept
/// alive by the caller's references; as with the tracked borrows, nothing stops another Python
/// thread from writing into them meanwhile. On any mismatch the checked path produces the error.
fn fast_slice<'a, T: Element>(
    obj: &'a Bound<'_, PyAny>,
    name: impl Fn() -> String,
    ndim: usize,
) -> PyResult<(&'a [T], &'a [usize])> {
    if let Ok(a) = obj.cast::<PyArrayDyn<T>>() {
        if a.ndim() == ndim && a.is_c_contiguous() {
            // SAFETY: see above; the array outlives 'a through `obj`.
            let s = unsafe { a.as_slice() }.map_err(|e| value_err(format!("{}: {e}", name())))?;
            let shape = a.shape();
            // SAFETY: the shape slice lives as long as the array object.
            let shape = unsafe { std::slice::from_raw_parts(shape.as_ptr(), shape.len()) };
            return Ok((s, shape));
        }
    }
    readonly::<T>(obj, &name(), ndim)?;
    Err(value_err(format!("{} could not be read", name())))
}

/// Per layer, (weight_ih, weight_hh, bias_ih, bias_hh), as checked when the stepper was made.
type StepArrays<T> = Vec<[Py<PyArrayDyn<T>>; 4]>;

enum AnyStepArrays {
    F32(StepArrays<f32>),
    F64(StepArrays<f64>),
}

/// The arrays of `tuples` as arrays of `T`, each checked (dtype, dimensions, C order).
fn step_arrays<T: Element>(tuples: &[[(Bound<'_, PyAny>, usize); 4]]) -> PyResult<StepArrays<T>> {
    let mut out = Vec::with_capacity(tuples.len());
    for (k, arrs) in tuples.iter().enumerate() {
        let mut typed = Vec::with_capacity(4);
        for ((a, nd), pname) in arrs.iter().zip(PARAM_NAMES) {
            readonly::<T>(a, &format!("weights[{k}].{pname}"), *nd)?;
            typed.push(a.cast::<PyArrayDyn<T>>()?.clone().unbind());
        }
        out.push(typed.try_into().map_err(|_| value_err("unreachable".into()))?);
    }
    Ok(out)
}

/// The slices of the stepper's arrays, and the hidden size, re-read at each step: the arrays
/// stay the same objects, but their contents (and, in principle, their shapes) may change.
fn step_weights<'a, T: Element>(py: Python<'a>, arrays: &'a StepArrays<T>) -> PyResult<(Vec<Weights<'a, T>>, usize)> {
    let mut ws = Vec::with_capacity(arrays.len());
    let mut hidden = 0;
    for (k, arrs) in arrays.iter().enumerate() {
        let mut views: [&[T]; 4] = [&[]; 4];
        for ((view, a), pname) in views.iter_mut().zip(arrs).zip(PARAM_NAMES) {
            let a = a.bind(py);
            // SAFETY: as in `fast_slice`; the stepper keeps the array alive.
            *view = unsafe { a.as_slice() }.map_err(|e| value_err(format!("weights[{k}].{pname}: {e}")))?;
        }
        let w_hh = arrs[1].bind(py);
        if w_hh.ndim() != 2 {
            return Err(value_err(format!("weights[{k}].weight_hh is no longer 2-D")));
        }
        hidden = w_hh.shape()[1];
        let [w_ih, w_hh, b_ih, b_hh] = views;
        ws.push(Weights { w_ih, w_hh, b_ih, b_hh });
    }
    Ok((ws, hidden))
}

/// Multiply-adds from which a step releases the GIL (below, releasing costs more than the step).
const STEP_DETACH_MACS: usize = 1 << 18;

fn step_t<'py, T: Wrap>(
    py: Python<'py>,
    cell: CellKind,
    arrays: &StepArrays<T>,
    x: &Bound<'py, PyAny>,
    h: Option<&Bound<'py, PyAny>>,
    c: Option<&Bound<'py, PyAny>>,
) -> PyResult<StepOut<'py>> {
    let (xs, xshape) = fast_slice::<T>(x, || "x".into(), 2)?;
    let (ws, hidden) = step_weights(py, arrays)?;
    let hs = match h {
        Some(o) => Some(fast_slice::<T>(o, || if c.is_some() { "state[0] (h)" } else { "state" }.into(), 3)?.0),
        None => None,
    };
    let cs = match c {
        Some(o) => Some(fast_slice::<T>(o, || "state[1] (c)".into(), 3)?.0),
        None => None,
    };
    let (batch, nl) = (xshape[0], ws.len());
    // Not cleared: the step writes every element (or fails, and they are dropped).
    // SAFETY: nothing reads them before the step has written them.
    let h_out = unsafe { PyArray3::<T>::new(py, [nl, batch, hidden], false) };
    let c_out = cell
        .has_c()
        .then(|| unsafe { PyArray3::<T>::new(py, [nl, batch, hidden], false) });
    let y = unsafe { PyArray2::<T>::new(py, [batch, hidden], false) };
    {
        // SAFETY: freshly created arrays that nothing else references yet.
        let ho = unsafe { h_out.as_slice_mut() }.expect("new array");
        let co: &mut [T] = match c_out.as_ref() {
            Some(a) => unsafe { a.as_slice_mut() }.expect("new array"),
            None => &mut [],
        };
        // Release the GIL when the step is big enough for that to matter to other threads.
        let work: usize = ws.iter().map(|w| batch * (w.w_ih.len() + w.w_hh.len())).sum();
        if work >= STEP_DETACH_MACS {
            py.detach(|| sweep::step(cell, xs, batch, hidden, &ws, hs, cs, ho, co))?;
        } else {
            sweep::step(cell, xs, batch, hidden, &ws, hs, cs, ho, co)?;
        }
        let last = &ho[(nl - 1) * batch * hidden..];
        unsafe { y.as_slice_mut() }.expect("new array").copy_from_slice(last);
    }
    let state = match c_out {
        Some(c) => PyTuple::new(py, [h_out.into_any(), c.into_any()])?.into_any(),
        None => h_out.into_any(),
    };
    Ok((y.into_any(), state))
}

/// (y, state) of a step.
type StepOut<'py> = (Bound<'py, PyAny>, Bound<'py, PyAny>);

/// The weights of a stack of single-direction layers, checked once, for streaming inference:
/// `stepper(x, state)` runs one time step of every layer, with as little work per call beside
/// the step's own as can be.
///
/// `weights` holds one 4-tuple (weight_ih, weight_hh, bias_ih, bias_hh) per layer; the stepper
/// keeps these arrays and reads their current contents at each step. Pickling (and copying)
/// gives a stepper over the pickled (copied) arrays.
#[pyclass(module = "rnnkit._core", name = "Stepper", frozen)]
pub struct PyStepper {
    cell: CellKind,
    /// The weights as given (for pickling).
    weights: Py<PyAny>,
    arrays: AnyStepArrays,
}

#[pymethods]
impl PyStepper {
    #[new]
    fn new(cell: &str, weights: &Bound<'_, PyAny>) -> PyResult<Self> {
        let kind = parse_cell(cell)?;
        let tuples = param_tuples(weights, "weights", |a, _, nd| Ok((a.clone(), nd)))?;
        let Some(first) = tuples.first() else {
            return Err(value_err("weights must hold at least one layer".into()));
        };
        let arrays = match float_kind(&first[0].0, "weights[0].weight_ih")? {
            "float32" => AnyStepArrays::F32(step_arrays(&tuples)?),
            _ => AnyStepArrays::F64(step_arrays(&tuples)?),
        };
        let input = first[0].0.cast::<PyUntypedArray>()?.shape()[1];
        fn check<T: Element>(py: Python<'_>, kind: CellKind, input: usize, a: &StepArrays<T>) -> PyResult<()> {
            let (ws, hidden) = step_weights(py, a)?;
            Ok(sweep::check_stack(kind, 1, input, hidden, &ws)?)
        }
        match &arrays {
            AnyStepArrays::F32(a) => check(weights.py(), kind, input, a)?,
            AnyStepArrays::F64(a) => check(weights.py(), kind, input, a)?,
        }
        Ok(PyStepper {
            cell: kind,
            weights: weights.clone().unbind(),
            arrays,
        })
    }

    /// One time step of every layer: `x` is (batch, input), `state` the state (layers, batch,
    /// hidden) of every layer, a tuple (h, c) for LSTM (None: zeros). Returns `(y, state)`, y
    /// (batch, hidden) being the last layer's new h. `x` and the state must have the weights'
    /// dtype and be C-contiguous.
    #[pyo3(signature = (x, state=None))]
    fn __call__<'py>(&self, x: &Bound<'py, PyAny>, state: Option<&Bound<'py, PyAny>>) -> PyResult<StepOut<'py>> {
        let py = x.py();
        let (h, c) = match state.filter(|s| !s.is_none()) {
            None => (None, None),
            Some(s) if self.cell.has_c() => {
                let pair = s.cast::<PyTuple>().map_err(|_| {
                    PyTypeError::new_err(format!("state must be a tuple (h, c) for LSTM; got {}", type_name(s)))
                })?;
                if pair.len() != 2 {
                    return Err(PyTypeError::new_err(format!(
                        "state must be a tuple (h, c) for LSTM; got a tuple of {}",
                        pair.len()
                    )));
                }
                (Some(pair.get_item(0)?), Some(pair.get_item(1)?))
            }
            Some(s) => (Some(s.clone()), None),
        };
        match &self.arrays {
            AnyStepArrays::F32(a) => step_t::<f32>(py, self.cell, a, x, h.as_ref(), c.as_ref()),
            AnyStepArrays::F64(a) => step_t::<f64>(py, self.cell, a, x, h.as_ref(), c.as_ref()),
        }
    }

    fn __reduce__<'py>(slf: &Bound<'py, Self>) -> (Bound<'py, pyo3::types::PyType>, (&'static str, Py<PyAny>)) {
        let me = slf.get();
        (slf.get_type(), (me.cell.name(), me.weights.clone_ref(slf.py())))
    }

    fn __repr__(&self) -> String {
        let layers = match &self.arrays {
            AnyStepArrays::F32(a) => a.len(),
            AnyStepArrays::F64(a) => a.len(),
        };
        format!("<rnnkit Stepper {} x{layers}>", self.cell.name())
    }
}

fn matmul_t<T: Wrap>(
    py: Python<'_>,
    a: &Bound<'_, PyAny>,
    b: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    trans: (bool, bool),
    accumulate: bool,
) -> PyResult<()> {
    let (aa, ba) = (readonly::<T>(a, "a", 2)?, readonly::<T>(b, "b", 2)?);
    let mut oa = readwrite::<T>(out, "out", 2)?;
    let view = |arr: &PyReadonlyArrayDyn<'_, T>, t: bool| {
        let (r, c) = (arr.shape()[0], arr.shape()[1]);
        let m = Mat::new(slice(arr), r, c, c.max(1));
        if t {
            m.t()
        } else {
            m
        }
    };
    let (am, bm) = (view(&aa, trans.0), view(&ba, trans.1));
    let (m, k, n) = (am.rows(), am.cols(), bm.cols());
    if bm.rows() != k {
        return Err(value_err(format!(
            "the inner dimensions differ: op(a) is {m}x{k}, op(b) is {}x{n}",
            bm.rows()
        )));
    }
    if oa.shape() != [m, n] {
        return Err(value_err(format!(
            "out must have shape ({m}, {n}); got {:?}",
            oa.shape()
        )));
    }
    let dst = MatMut::new(oa.as_slice_mut().expect("checked C-contiguous"), m, n, n.max(1));
    let flops = 2 * m * k * n;
    py.detach(|| crate::threads::run(flops, false, |threads| matmul(dst, accumulate, am, bm, threads)))?;
    Ok(())
}

/// `out = op(a) @ op(b)` (or `out += ...` with `accumulate`) for 2-D C-contiguous arrays of one
/// float dtype, where op transposes when `trans_a` / `trans_b` is set: the products of the Python
/// layers run on the kernel threads, so NumPy's BLAS threads are not woken beside them.
#[pyfunction]
#[pyo3(name = "matmul", signature = (a, b, out, *, trans_a=false, trans_b=false, accumulate=false))]
fn py_matmul(
    py: Python<'_>,
    a: &Bound<'_, PyAny>,
    b: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    trans_a: bool,
    trans_b: bool,
    accumulate: bool,
) -> PyResult<()> {
    match float_kind(a, "a")? {
        "float32" => matmul_t::<f32>(py, a, b, out, (trans_a, trans_b), accumulate),
        _ => matmul_t::<f64>(py, a, b, out, (trans_a, trans_b), accumulate),
    }
}

/// Use `n` threads for the kernels (1 disables threading).
#[pyfunction]
fn set_num_threads(py: Python<'_>, n: i64) -> PyResult<()> {
    let n = usize::try_from(n)
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| value_err(format!("n must be a positive integer; got {n}")))?;
    py.detach(|| crate::threads::set_num_threads(n))?;
    Ok(())
}

/// The number of threads the kernels use.
#[pyfunction]
fn get_num_threads() -> usize {
    crate::threads::get_num_threads()
}

/// The instruction set the pointwise kernels were dispatched to: "avx512", "avx2" or "baseline".
#[pyfunction]
fn simd_level() -> &'static str {
    crate::simd::level().name()
}

/// Number of gate blocks of a cell ("rnn_tanh", "rnn_relu", "lstm", "gru").
#[pyfunction]
fn gates(cell: &str) -> PyResult<usize> {
    Ok(parse_cell(cell)?.gates())
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(forward, m)?)?;
    m.add_function(wrap_pyfunction!(backward, m)?)?;
    m.add_function(wrap_pyfunction!(py_matmul, m)?)?;
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(get_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(simd_level, m)?)?;
    m.add_function(wrap_pyfunction!(gates, m)?)?;
    m.add_class::<PyTape>()?;
    m.add_class::<PyWeightCache>()?;
    m.add_class::<PyStepper>()?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
