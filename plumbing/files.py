"""Files we write and files a user hands us. Every file we write goes through atomic_write (a reader never sees half
a file, and a link planted at its name is replaced, never written through), figures through write_figure. Every
file a user hands us (weights, run records, caches) is untrusted: read only as a regular file of bounded size, in
the formats named, never unpickled; tensors are checked against the model before they are used."""

from plumbing.stops import UserError

import contextlib
import errno
import functools
import hashlib
import io
import logging
import os
import secrets
import stat
import tempfile
import warnings
import zipfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parents[1]  # the project's folder: runs/ and data/ are found beside the scripts


class staged:
    """`data` written to a temporary file beside path at once (a full disk fails here, in one line), renamed over path
    when the `with` block around it ends, deleted instead if the block fails: what the block writes first (a run's
    record) can name it before it is in place.

    The rename replaces whatever is at path, a symlink included, instead of writing through it. Each writer creates
    its own temporary file (a random name, O_EXCL), so two runs writing the same file at once never mix their
    bytes; it gets the mode the umask gives, as any new file."""

    def __init__(self, path, data):
        self.path, self.tmp, created = path, path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp"), False
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
            with open(os.open(self.tmp, flags, 0o666), "wb") as f:
                created = True
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException as error:  # Ctrl-C included: a half-written temporary file is never left behind
            if created:
                self.tmp.unlink(missing_ok=True)
            self.fail(error)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                os.replace(self.tmp, self.path)
        except OSError as error:
            self.fail(error)
        finally:
            self.tmp.unlink(missing_ok=True)  # a rename done leaves nothing to delete
        return False

    def fail(self, error):
        if not isinstance(error, OSError):
            raise error
        advice = "free some space or " if error.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        raise UserError(f"cannot write {self.path}: {error.strerror}; {advice}choose another folder or file") from None


def atomic_write(path, data):
    """Write-then-rename (staged), so a reader never sees a half-written file; a full disk is a user error."""
    with staged(path, data):
        pass


def tensor_bytes(tensors):
    """A dict of tensors (and strings) in torch's format, on the CPU: no pickle is needed to load it."""
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in tensors.items()}, buffer)
    return buffer.getvalue()


def fingerprint(tensors):
    """A short hash of a state dict's names, types, shapes and values: the same whichever file holds them."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


def save_tensors(path, tensors):
    """A dict of tensors (and strings), saved atomically in torch's format."""
    atomic_write(path, tensor_bytes(tensors))


def kind(path, what):
    """What is at path: "file" (a regular one), "folder", "other" (a pipe, a device) or None (nothing). Where it cannot
    be looked at (a folder above it that may not be searched, a symlink loop: pathlib raises, os.path answers "not
    there"), a UserError naming `what` and why. The one probe of a path a user names."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError) as error:  # ValueError: a NUL in the name
        reason = "a symlink loop" if getattr(error, "errno", None) == errno.ELOOP else getattr(error, "strerror", "")
        raise UserError(
            f"{what} {path}: cannot look at it ({reason or 'not a path'}); fix the permissions of the folders it is "
            "in, or choose another"
        ) from None
    return "folder" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode) else "other"


def writable_folder(path, flag):
    """path, created if needed and checked to be a folder we can write to, before any long work uses it."""
    if kind(path, flag) not in (None, "folder"):
        raise UserError(f"{flag} {path} is a file, not a folder; point {flag} at a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as error:
        raise UserError(
            f"{flag} {path} is not writable ({error.strerror}); point {flag} at a writable folder"
        ) from None
    return path


def write_figure(plot, path, *args):
    """The figure plot(*args), written to path as every output is (atomic_write: a link planted there is replaced,
    never followed), in matplotlib's default style whatever a matplotlibrc asks (text.usetex would need LaTeX), but
    in the fonts it names (a CJK font, say). Text those fonts cannot draw (a Chinese or Japanese file name, an
    emoji) is drawn in a font of the machine that can (legible_text); a character none has is a box, without
    matplotlib's warning; a font the machine lacks gives way to matplotlib's own, without a warning for each text.
    Whatever stops it (a full disk, a read-only folder, a matplotlib that fails) is a UserError naming the file."""
    import matplotlib
    import matplotlib.style

    logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)  # "findfont: ... not found", hundreds

    fonts = {k: v for k, v in matplotlib.rcParams.items() if k == "font.family" or k in FONT_LISTS}
    try:
        buffer = io.BytesIO()
        with matplotlib.style.context(["default", fonts, {"text.usetex": False}]), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Glyph .* missing from font", UserWarning)
            figure = plot(*args)
            legible_text(figure)
            figure.savefig(buffer, format=path.suffix.lstrip(".").lower() or "png")
        atomic_write(path, buffer.getvalue())
    except Exception as error:  # atomic_write's UserError included
        reason = str(error).splitlines()[0] if str(error) else ""
        reason = reason if isinstance(error, UserError) else f"{type(error).__name__}: {reason}".rstrip(": ")
        raise UserError(f"{path.name} not drawn ({reason})") from None


FONT_LISTS = [f"font.{generic}" for generic in ("sans-serif", "serif", "monospace", "cursive", "fantasy")]


def legible_text(figure):
    """Fonts of the machine that have the characters of the figure's text that its font lacks, added after the
    fonts it asks for: matplotlib falls back along a text's font family list, glyph by glyph."""
    from matplotlib import font_manager
    from matplotlib.text import Text

    for ax in figure.axes:  # tick labels exist once asked for; those made later copy the first one's font
        ax.get_xticklabels(which="both"), ax.get_yticklabels(which="both")
    texts = figure.findobj(Text)
    first = glyphs(font_manager.findfont(font_manager.FontProperties()))
    missing = {c for t in texts for c in t.get_text() if c.isprintable() and not c.isspace() and ord(c) not in first}
    extra = {}
    # matplotlib's own last resort (a box naming the script) only where no real font has the character
    fonts = sorted(font_manager.fontManager.ttflist, key=lambda f: f.name.startswith("Last Resort"))
    for c in sorted(missing):
        font = next((f for f in fonts if ord(c) in glyphs(f.fname)), None)
        if font is not None:
            extra[font.name] = True
    for text in texts if extra else ():
        text.set_fontfamily(list(dict.fromkeys([*text.get_fontfamily(), *extra])))


@functools.cache
def glyphs(font_path):
    """The characters (as code points) a font file can draw; none for one matplotlib cannot draw with (a colour
    emoji font of bitmaps only)."""
    from matplotlib import font_manager

    try:
        font = font_manager.get_font(font_path)
        font.set_size(10, 72)
        return frozenset(font.get_charmap())
    except Exception:  # FreeType's errors: the font is passed over
        return frozenset()


# ----------------------------------------------------------------------------------------------
# Files a user hands us


def read_file(path, what, limit):
    """The bytes of a file a user handed us (a record, weights, a cache), refused in one line naming `what`
    unless it is a regular file of at most `limit` bytes: a FIFO would hang, /dev/zero never end. Only the file's
    own size is read (and a byte more, should it grow meanwhile), however large the limit."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # opening a FIFO must not wait for a writer
        with os.fdopen(fd, "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise UserError(f"{what} {path}: not a regular file (a folder, pipe or device), so not read")
            data = f.read(min(info.st_size, limit) + 1)
    except OSError as error:
        raise UserError(f"{what} {path}: cannot read it ({error.strerror})") from None
    if len(data) > limit:
        raise UserError(f"{what} {path}: larger than the {limit:,} bytes such a file can be, so not read")
    return data


def load_tensors(path, what, limit):
    """The dict of tensors torch.save wrote to path, loaded without running any code in it and refused in one line
    naming `what` unless its tensors take at most `limit` bytes: the size is read from the file's table of
    contents before anything is inflated. `{"state_dict": ...}`, as training frameworks save weights, is
    unwrapped."""
    with contextlib.suppress(OSError):  # read_file names a file that cannot be read
        if os.stat(path).st_size > limit + 2**20:  # the tensors, and a little room for their names
            raise UserError(
                f"{what} {path}: {os.stat(path).st_size:,} bytes, more than the {limit:,} the expected tensors "
                "take: the weights of another model, or no weights"
            )
    data = read_file(path, what, limit + 2**20)
    if not data:
        raise UserError(f"{what} {path}: the file is empty")
    try:
        inflated = 0  # torch's older format (not a zip) stores its tensors as they are: nothing to inflate
        if zipfile.is_zipfile(io.BytesIO(data)):
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                inflated = sum(entry.file_size for entry in archive.infolist())
        if inflated > limit + 2**20:
            raise UserError(f"{what} {path}: its tensors would take {inflated:,} bytes, more than expected ({limit:,})")
        with warnings.catch_warnings():  # torch warns about unusual pickles: the one line below says it all
            warnings.simplefilter("ignore")
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except UserError:
        raise
    except Exception as error:  # pickle, zip and format errors all mean the same thing to the user
        if "Weights only load failed" in str(error):
            raise UserError(
                f"{what} {path}: holds pickled Python objects (a whole model, or code), which are never loaded "
                "here because loading them can run code; save and pass model.state_dict() instead"
            ) from None
        raise UserError(f"{what} {path}: not a file written by torch.save (empty, corrupt or another format)") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    tensors = {k: v for k, v in state.items() if torch.is_tensor(v)} if isinstance(state, dict) else {}
    if not tensors or not all(isinstance(name, str) for name in tensors):
        raise UserError(f"{what} {path}: holds no state dict (a dict of parameter names, text, to tensors)")
    for name, tensor in tensors.items():  # names, shapes and types may fit while the tensor holds no values to use
        kind = unusable(tensor)
        if kind:
            raise UserError(
                f"{what} {path}: {name} is a {kind} tensor, not a dense one with its values on the CPU: the file is "
                "damaged or of another kind"
            )
    return tensors


def unusable(tensor):
    """What a loaded tensor is, in a word or two, unless it is what weights and features are: dense and strided,
    its values in memory on the CPU ("" then). A meta tensor has a shape and no values; a nested one no one shape."""
    kinds = (
        ("nested", tensor.is_nested),
        (str(tensor.layout).removeprefix("torch."), tensor.layout != torch.strided),
        (tensor.device.type, tensor.device.type != "cpu"),  # meta: a shape without values
    )
    return " ".join(kind for kind, applies in kinds if applies)


# The types weights may come in (copied into the model's own as they are loaded): no complex numbers, 8-bit floats or
# quantized tensors, which the checks below and load_state_dict cannot take (load_tensors refused sparse ones).
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INTEGERS = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def state_bytes(model):
    """The bytes a state dict of the model takes: what a weights file for it may hold."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def check_state_dict(state, model, what, name):
    """Refuse, in words, a state dict whose names, shapes or values do not fit the model (called `name`)."""
    expected = model.state_dict()
    missing, foreign = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or foreign:
        example = f"it lacks {missing[0]}" if missing else f"it has {foreign[0]}"
        raise UserError(
            f"{what}: not a {name} state dict ({len(missing)} of its {len(expected)} tensors missing, "
            f"{len(foreign)} foreign: {example}); was it saved from another architecture?"
        )
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise UserError(
                f"{what}: not a {name} state dict ({key} has shape {tuple(state[key].shape)} where {name} has "
                f"{tuple(tensor.shape)}: the weights come from a model of other sizes)"
            )
        value = state[key]
        kinds = FLOATS if tensor.is_floating_point() else INTEGERS
        if value.dtype not in kinds:  # the layout was checked as the file was loaded
            raise UserError(
                f"{what}: {key} is a {str(value.dtype).removeprefix('torch.')} tensor where {name} "
                f"has {str(tensor.dtype).removeprefix('torch.')}: the weights are damaged or of another kind"
            )
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise UserError(f"{what}: {key} holds NaN or infinite values: the weights are damaged")
        if key.endswith("running_var") and (value < 0).any():
            raise UserError(f"{what}: {key} holds negative variances: the weights are damaged")
