//! Code conversion (HULFT's コード変換): a whole text file decoded from one
//! character encoding and written in another, its newlines made `lf` or
//! `crlf` (or kept), streaming through bounded buffers, never the whole
//! file in memory.
//!
//! - Decoding and encoding are encoding_rs's (WHATWG): its `Shift_JIS` is
//!   Windows code page 932 (NEC and IBM extensions, such as `①`), the one
//!   Japanese business files use. UTF-16 output is written here from the
//!   decoded text (encoding_rs's UTF-16 encoders write UTF-8).
//! - A byte order mark at the start of the input (U+FEFF decoded) is
//!   stripped and never counted as text; `bom: true` writes one for a
//!   UTF-8 or UTF-16 target.
//! - A byte that does not decode, or a character the target cannot hold,
//!   fails the conversion ([`ConvertError`], with the input's byte offset and
//!   1-based line), unless `on_error: replace`: then U+FFFD (or `?` for a
//!   target without it) stands in its place.
//! - The records counted are the output's lines: newlines, plus one for a
//!   last line without one.

use std::fmt;
use std::io::{self, Read, Seek, SeekFrom, Write};

use encoding_rs::{
    DecoderResult, EUC_JP, EncoderResult, Encoding, ISO_2022_JP, SHIFT_JIS, UTF_8, UTF_16BE,
    UTF_16LE,
};
use sha2::{Digest, Sha256};

/// Input bytes read per step.
const READ: usize = 64 * 1024;

/// A character encoding a profile may convert from or to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Charset {
    Utf8,
    /// Windows code page 932.
    ShiftJis,
    EucJp,
    Iso2022Jp,
    Utf16Le,
    Utf16Be,
}

impl Charset {
    /// The names a configuration may use, for error messages.
    pub const NAMES: &'static str =
        "utf-8, shift_jis (cp932), euc-jp, iso-2022-jp, utf-16le, utf-16be";

    pub fn parse(name: &str) -> Option<Charset> {
        let n = name.trim().to_ascii_lowercase().replace('_', "-");
        Some(match n.as_str() {
            "utf-8" | "utf8" => Charset::Utf8,
            "shift-jis" | "sjis" | "cp932" | "windows-31j" | "ms932" => Charset::ShiftJis,
            "euc-jp" | "eucjp" => Charset::EucJp,
            "iso-2022-jp" | "jis" => Charset::Iso2022Jp,
            "utf-16le" => Charset::Utf16Le,
            "utf-16be" => Charset::Utf16Be,
            _ => return None,
        })
    }

    fn encoding(self) -> &'static Encoding {
        match self {
            Charset::Utf8 => UTF_8,
            Charset::ShiftJis => SHIFT_JIS,
            Charset::EucJp => EUC_JP,
            Charset::Iso2022Jp => ISO_2022_JP,
            Charset::Utf16Le => UTF_16LE,
            Charset::Utf16Be => UTF_16BE,
        }
    }

    /// True for the encodings that hold every character and have a BOM.
    pub fn is_unicode(self) -> bool {
        matches!(self, Charset::Utf8 | Charset::Utf16Le | Charset::Utf16Be)
    }
}

impl fmt::Display for Charset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Charset::Utf8 => "utf-8",
            Charset::ShiftJis => "shift_jis",
            Charset::EucJp => "euc-jp",
            Charset::Iso2022Jp => "iso-2022-jp",
            Charset::Utf16Le => "utf-16le",
            Charset::Utf16Be => "utf-16be",
        })
    }
}

/// What the output's newlines become.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Newline {
    /// `\r\n` becomes `\n`; a lone `\r` stays.
    Lf,
    /// A `\n` without `\r` before it becomes `\r\n`.
    Crlf,
    Keep,
}

/// What a byte that does not decode, or a character that cannot be encoded, does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    Fail,
    Replace,
}

/// A profile's `convert:`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Convert {
    pub from: Charset,
    pub to: Charset,
    pub newline: Newline,
    pub on_error: OnError,
    /// Write a byte order mark (UTF-8 and UTF-16 targets only).
    pub bom: bool,
}

/// What a conversion wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Converted {
    /// Lines of the output.
    pub records: u64,
    /// Bytes written.
    pub size: u64,
    /// Lower-case hex SHA-256 of the output.
    pub sha256: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error(
        "byte offset {offset} (line {line}) is not valid {from}: the file could not be converted to {to}; fix the file, or set convert.on_error: replace"
    )]
    Undecodable {
        offset: u64,
        line: u64,
        from: Charset,
        to: Charset,
    },
    #[error(
        "the character {ch} at byte offset {offset} (line {line}) has no {to} form: the file could not be converted; fix the file, or set convert.on_error: replace"
    )]
    Unmappable {
        ch: String,
        offset: u64,
        line: u64,
        to: Charset,
    },
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Converts `input` (read from its start) into `output` as `spec` says.
pub fn convert<R: Read + Seek, W: Write>(
    spec: &Convert,
    input: &mut R,
    output: W,
) -> Result<Converted, ConvertError> {
    input.seek(SeekFrom::Start(0))?;
    let mut out = Sink {
        w: output,
        hash: Sha256::new(),
        size: 0,
    };
    let mut text = TextStep::new(spec);
    if spec.bom {
        match spec.to {
            Charset::Utf8 => out.write(b"\xEF\xBB\xBF")?,
            Charset::Utf16Le => out.write(b"\xFF\xFE")?,
            Charset::Utf16Be => out.write(b"\xFE\xFF")?,
            _ => {}
        }
    }
    let mut decoder = spec.from.encoding().new_decoder_without_bom_handling();
    let mut src = vec![0u8; READ];
    let mut utf8 = vec![0u8; 4 * READ + 16];
    let mut consumed: u64 = 0;
    loop {
        let n = read_full(input, &mut src)?;
        let last = n == 0;
        let mut at = 0;
        loop {
            let (result, read, written) =
                decoder.decode_to_utf8_without_replacement(&src[at..n], &mut utf8, last);
            at += read;
            // encoding_rs writes valid UTF-8 only.
            let piece = std::str::from_utf8(&utf8[..written]).map_err(io::Error::other)?;
            text.push(piece, &mut out)?;
            match result {
                DecoderResult::InputEmpty => break,
                DecoderResult::OutputFull => {}
                DecoderResult::Malformed(bad, extra) => {
                    if spec.on_error == OnError::Fail {
                        let offset = (consumed + at as u64)
                            .saturating_sub(u64::from(bad) + u64::from(extra));
                        return Err(ConvertError::Undecodable {
                            offset,
                            line: text.line(),
                            from: spec.from,
                            to: spec.to,
                        });
                    }
                    text.push("\u{FFFD}", &mut out)?;
                }
            }
        }
        consumed += n as u64;
        if last {
            break;
        }
    }
    match text.finish(&mut out) {
        Ok(()) => {}
        Err(Stop::Io(e)) => return Err(e.into()),
        Err(Stop::Unmappable(ch)) => return Err(locate_unmappable(spec, input, &ch)),
    }
    out.w.flush()?;
    Ok(Converted {
        records: text.records(),
        size: out.size,
        sha256: hex::encode(out.hash.finalize()),
    })
}

/// Reads until `buf` is full or the input ends.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// The output, hashed and counted as it is written.
struct Sink<W: Write> {
    w: W,
    hash: Sha256,
    size: u64,
}

impl<W: Write> Sink<W> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.hash.update(bytes);
        self.size += bytes.len() as u64;
        self.w.write_all(bytes)
    }
}

/// Why the text step stopped.
enum Stop {
    Io(io::Error),
    /// The first character the target cannot hold (with `on_error: fail`).
    Unmappable(String),
}

impl From<io::Error> for Stop {
    fn from(e: io::Error) -> Stop {
        Stop::Io(e)
    }
}

/// The decoded text on its way out: BOM stripped, newlines converted and
/// counted, encoded.
struct TextStep {
    spec: Convert,
    started: bool,
    /// The last piece ended with `\r` (held back in mode `lf`).
    pending_cr: bool,
    /// The last character written was `\r` (mode `crlf`).
    prev_cr: bool,
    newlines: u64,
    /// The output's last character was not a newline.
    open_line: bool,
    line_buf: String,
    encoder: Option<encoding_rs::Encoder>,
    enc_buf: Vec<u8>,
    /// An unmappable character met with `on_error: fail`.
    unmappable: Option<String>,
}

impl TextStep {
    fn new(spec: &Convert) -> TextStep {
        let encoder = (!spec.to.is_unicode()).then(|| spec.to.encoding().new_encoder());
        TextStep {
            spec: *spec,
            started: false,
            pending_cr: false,
            prev_cr: false,
            newlines: 0,
            open_line: false,
            line_buf: String::new(),
            encoder,
            enc_buf: vec![0u8; 4 * READ + 64],
            unmappable: None,
        }
    }

    /// The 1-based line the text decoded so far ends on.
    fn line(&self) -> u64 {
        self.newlines + 1
    }

    fn records(&self) -> u64 {
        self.newlines + u64::from(self.open_line)
    }

    fn push<W: Write>(&mut self, piece: &str, out: &mut Sink<W>) -> Result<(), ConvertError> {
        if self.unmappable.is_some() {
            return Ok(());
        }
        let mut piece = piece;
        if !self.started && !piece.is_empty() {
            self.started = true;
            piece = piece.strip_prefix('\u{FEFF}').unwrap_or(piece);
        }
        if piece.is_empty() {
            return Ok(());
        }
        self.newlines += piece.bytes().filter(|&b| b == b'\n').count() as u64;
        let mut buf = std::mem::take(&mut self.line_buf);
        buf.clear();
        match self.spec.newline {
            Newline::Keep => buf.push_str(piece),
            Newline::Lf => {
                let mut rest = piece;
                if self.pending_cr {
                    self.pending_cr = false;
                    if !rest.starts_with('\n') {
                        buf.push('\r');
                    }
                }
                if let Some(r) = rest.strip_suffix('\r') {
                    self.pending_cr = true;
                    rest = r;
                }
                let mut last = 0;
                for (i, _) in rest.match_indices("\r\n") {
                    buf.push_str(&rest[last..i]);
                    last = i + 1;
                }
                buf.push_str(&rest[last..]);
            }
            Newline::Crlf => {
                let mut last = 0;
                for (i, _) in piece.match_indices('\n') {
                    let before_cr = if i == 0 {
                        self.prev_cr
                    } else {
                        piece.as_bytes()[i - 1] == b'\r'
                    };
                    buf.push_str(&piece[last..i]);
                    if !before_cr {
                        buf.push('\r');
                    }
                    last = i;
                }
                buf.push_str(&piece[last..]);
                self.prev_cr = piece.ends_with('\r');
            }
        }
        if self.pending_cr {
            self.open_line = true;
        } else if let Some(c) = buf.chars().last() {
            self.open_line = c != '\n';
        }
        let r = self.encode(&buf, false, out);
        self.line_buf = buf;
        match r {
            Ok(()) => Ok(()),
            Err(Stop::Io(e)) => Err(e.into()),
            Err(Stop::Unmappable(ch)) => {
                self.unmappable = Some(ch);
                Ok(())
            }
        }
    }

    fn finish<W: Write>(&mut self, out: &mut Sink<W>) -> Result<(), Stop> {
        if let Some(ch) = self.unmappable.take() {
            return Err(Stop::Unmappable(ch));
        }
        let tail = if self.pending_cr { "\r" } else { "" };
        self.pending_cr = false;
        if !tail.is_empty() {
            self.open_line = true;
        }
        self.encode(tail, true, out)
    }

    fn encode<W: Write>(&mut self, text: &str, last: bool, out: &mut Sink<W>) -> Result<(), Stop> {
        match self.spec.to {
            Charset::Utf8 => return Ok(out.write(text.as_bytes())?),
            Charset::Utf16Le | Charset::Utf16Be => {
                let le = self.spec.to == Charset::Utf16Le;
                let mut bytes = Vec::with_capacity(text.len() * 2);
                for u in text.encode_utf16() {
                    bytes.extend_from_slice(&if le { u.to_le_bytes() } else { u.to_be_bytes() });
                }
                return Ok(out.write(&bytes)?);
            }
            _ => {}
        }
        let Some(encoder) = self.encoder.as_mut() else {
            return Ok(());
        };
        let mut rest = text;
        loop {
            let (result, read, written) =
                encoder.encode_from_utf8_without_replacement(rest, &mut self.enc_buf, last);
            out.write(&self.enc_buf[..written])?;
            rest = &rest[read..];
            match result {
                EncoderResult::InputEmpty => return Ok(()),
                EncoderResult::OutputFull => {}
                EncoderResult::Unmappable(c) => {
                    if self.spec.on_error == OnError::Fail {
                        return Err(Stop::Unmappable(format!("U+{:04X} ({c})", c as u32)));
                    }
                    // `?` is ASCII, which every target holds.
                    let (_, _, w) =
                        encoder.encode_from_utf8_without_replacement("?", &mut self.enc_buf, false);
                    out.write(&self.enc_buf[..w])?;
                }
            }
        }
    }
}

/// Where the first character the target cannot hold is in the input: the
/// input decoded again a byte at a time (only on this failure), each
/// character tried on the target.
fn locate_unmappable<R: Read + Seek>(spec: &Convert, input: &mut R, ch: &str) -> ConvertError {
    let unknown = |ch: &str| ConvertError::Unmappable {
        ch: ch.to_string(),
        offset: 0,
        line: 0,
        to: spec.to,
    };
    if input.seek(SeekFrom::Start(0)).is_err() {
        return unknown(ch);
    }
    let mut decoder = spec.from.encoding().new_decoder_without_bom_handling();
    let mut probe = spec.to.encoding().new_encoder();
    let mut reader = io::BufReader::new(input);
    let (mut offset, mut char_start, mut line) = (0u64, 0u64, 1u64);
    let mut first = true;
    let mut byte = [0u8; 1];
    let mut utf8 = [0u8; 64];
    let mut enc = [0u8; 64];
    loop {
        let n = match reader.read(&mut byte) {
            Ok(n) => n,
            Err(_) => return unknown(ch),
        };
        let (_, _, written) =
            decoder.decode_to_utf8_without_replacement(&byte[..n], &mut utf8, n == 0);
        offset += n as u64;
        let Ok(decoded) = std::str::from_utf8(&utf8[..written]) else {
            return unknown(ch);
        };
        for c in decoded.chars() {
            if std::mem::take(&mut first) && c == '\u{FEFF}' {
                continue;
            }
            let mut tmp = [0u8; 4];
            let (result, _, _) = probe.encode_from_utf8_without_replacement(
                c.encode_utf8(&mut tmp),
                &mut enc,
                false,
            );
            if let EncoderResult::Unmappable(c) = result {
                return ConvertError::Unmappable {
                    ch: format!("U+{:04X} ({c})", c as u32),
                    offset: char_start,
                    line,
                    to: spec.to,
                };
            }
            if c == '\n' {
                line += 1;
            }
        }
        if written > 0 {
            char_start = offset;
        }
        if n == 0 {
            return unknown(ch);
        }
    }
}

#[cfg(test)]
mod tests;
