/* One pass over a prompt that finds where the built-in PII recognizers must look.
 *
 * scan(text) -> (runs, keys, emails, cards, ipv4s, sks)
 *   runs: [(start, end, digits, last, flags), ...] the runs of digits and separators that
 *         can hold a card, SSN, phone, IPv4 or IBAN: exactly what recognizers._SHAPE_RUN
 *         finds in an ASCII text's shape and recognizers._NUMBER_RUN in any other text
 *         (that one only when the text holds 4+ digits), each with its digit count, the
 *         end of its last digit and the RUN_* bits of recognizers.py (what _run_info
 *         computes in Python);
 *   keys: a bit set of the API-key prefixes present (recognizers.KEY_* bits), and
 *         whether an IPv6 address may be there (recognizers.HINT_IPV6);
 *   emails: [(start, end), ...] around each "@", what recognizers._LOCAL_REVERSED (read
 *         backwards, at most 64 characters) and recognizers._DOMAIN match (the URL rule
 *         is applied in Python);
 *   cards: [(start, end), ...] the Luhn-valid matches of recognizers._CARD in each run
 *         of 7+ characters with 13+ digits (2 characters around it, as _run_window);
 *   ipv4s: [(start, end), ...] the matches of recognizers._IPV4 in each run of 7+
 *         characters with 3+ dots (the version-string rule is applied in Python);
 *   sks: [(start, end), ...] the matches of recognizers._SK_KEY ("sk-" keys).
 *
 * It replaces several passes of the regex engine with one loop. The rest stays in
 * recognizers.py: phones, SSNs, IBANs, other keys and IPv6 (their patterns run where this pass
 * points), the URL rule for e-mail addresses and the version rule for IPv4. Optional:
 * when this module is not built, recognizers.scan_python computes the same, and the tests
 * compare the two.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

enum { C_X = 0, C_D = 1, C_S = 2, C_P = 3 }; /* other, digit, separator, "." */

/* Bits of `keys`; the same values as KEY_* and HINT_IPV6 in recognizers.py. */
enum {
    K_SK = 1,      /* "sk-" */
    K_XOX = 2,     /* "xox" + one of abprse + "-" */
    K_AWS = 4,     /* "AKIA", "ASIA", "AIza" */
    K_STRIPE = 8,  /* "k_live_", "k_test_" */
    K_GITHUB = 16, /* "gh" + one of pousr + "_", "github_pat_" */
    K_JWT = 32,    /* "eyJ" */
    K_BEARER = 64, /* "Bearer", "bearer", "BEARER" */
    H_IPV6 = 128   /* ":" before ":" or a hex digit (every IPv6 hint starts so) */
};

/* Bits of a run's flags; the same values as RUN_* in recognizers.py. */
enum {
    R_SHAPED = 1, R_PLUS = 2, R_IBAN = 4, R_DOTS = 8, R_SSN = 16, R_NANP = 32, R_TRUNK = 64
};

static unsigned char cls[256];
static unsigned char look[256]; /* 1: a digit or a character the key prefixes end or start with */

static void init_classes(void) {
    for (int c = '0'; c <= '9'; c++) cls[c] = C_D;
    cls[' '] = cls['\t'] = cls['('] = cls[')'] = cls['-'] = cls['/'] = cls[0xA0] = C_S;
    cls['.'] = C_P;
    for (int c = '0'; c <= '9'; c++) look[c] = 1;
    look['-'] = look['A'] = look['_'] = look['J'] = look['B'] = look['b'] = look[':'] = look['@'] = 1;
}

#define CLASS(c) ((c) < 256 ? cls[(c)] : C_X)
#define IS_DIGIT(c) ((c) >= '0' && (c) <= '9')
#define IS_UPPER(c) ((c) >= 'A' && (c) <= 'Z')
#define IS_LETTER(c) (IS_UPPER(c) || ((c) >= 'a' && (c) <= 'z'))
#define IS_ALNUM(c) (IS_LETTER(c) || IS_DIGIT(c))
#define IS_LDH(c) (IS_ALNUM(c) || (c) == '-') /* a domain label's characters */
#define IS_ATOM(c) (IS_ALNUM(c) || (c) == '_' || (c) == '%' || (c) == '+' || (c) == '-')
#define LOCAL_MAX 64
/* the regex engine's \w on str patterns */
#define IS_WORD(c) (Py_UNICODE_ISALNUM(c) || (c) == '_')
#define IS_SEP(c) (CLASS(c) >= C_S) /* a separator or "." */
#define IS_RUN(c) (CLASS(c) != C_X)
/* A separator of the shape's class "s" (not "."): space, tab, ( ) - / */
#define IS_S(c) ((c) == ' ' || (c) == '\t' || (c) == '(' || (c) == ')' || (c) == '-' || (c) == '/')

/* The scanner, once per code unit width. */
#define DEFINE_SCAN(NAME, T)                                                                     \
    static int NAME##_digits_after(const T *s, Py_ssize_t n, Py_ssize_t j, int groups) {         \
        /* (?:[sp]{0,2}+d){groups} from j */                                                     \
        for (int g = 0; g < groups; g++) {                                                       \
            int seps = 0;                                                                        \
            while (seps < 2 && j < n && IS_SEP(s[j])) { j++; seps++; }                           \
            if (j >= n || !IS_DIGIT(s[j])) return 0;                                             \
            j++;                                                                                 \
        }                                                                                        \
        return 1;                                                                                \
    }                                                                                            \
    static int NAME##_ipv4_after(const T *s, Py_ssize_t n, Py_ssize_t j) {                       \
        /* d{0,2} p d{1,3} p d{1,3} p d from j (the first digit already read) */                 \
        int k = 0;                                                                               \
        while (k < 2 && j < n && IS_DIGIT(s[j])) { j++; k++; }                                   \
        for (int part = 0; part < 2; part++) {                                                   \
            if (j >= n || s[j] != '.') return 0;                                                 \
            j++;                                                                                 \
            k = 0;                                                                               \
            while (k < 3 && j < n && IS_DIGIT(s[j])) { j++; k++; }                               \
            if (k == 0) return 0;                                                                \
        }                                                                                        \
        return j + 1 < n && s[j] == '.' && IS_DIGIT(s[j + 1]);                                   \
    }                                                                                            \
    static Py_ssize_t NAME##_group(const T *s, Py_ssize_t end, Py_ssize_t j) {                 \
        /* how many digits from j on */                                                          \
        Py_ssize_t k = j;                                                                        \
        while (k < end && IS_DIGIT(s[k])) k++;                                                   \
        return k - j;                                                                            \
    }                                                                                            \
    static int NAME##_card_tail(const T *s, Py_ssize_t hi, Py_ssize_t r, Py_UCS4 sep) {          \
        /* (?!\w)(?!sep[0-9])(?![.,][0-9]) at r, the text ending at hi */                       \
        if (r >= hi) return 1;                                                                   \
        if (IS_WORD(s[r])) return 0;                                                             \
        return !(r + 1 < hi && (s[r] == sep || s[r] == '.' || s[r] == ',') && IS_DIGIT(s[r + 1])); \
    }                                                                                            \
    static int NAME##_digits_at(const T *s, Py_ssize_t hi, Py_ssize_t j, Py_ssize_t k) {         \
        /* k digits from j, all before hi */                                                     \
        if (j + k > hi) return 0;                                                                \
        for (Py_ssize_t x = j; x < j + k; x++) if (!IS_DIGIT(s[x])) return 0;                    \
        return 1;                                                                                \
    }                                                                                            \
    static Py_ssize_t NAME##_card_at(const T *s, Py_ssize_t p, Py_ssize_t hi) {                  \
        /* where recognizers._CARD matches at p ends, or -1 */                                   \
        if (s[p] < '2' || s[p] > '6') return -1;                                                 \
        if (p > 0 && IS_WORD(s[p - 1])) return -1;                                               \
        if (p >= 2 && IS_DIGIT(s[p - 2])                                                         \
            && (s[p - 1] == ' ' || s[p - 1] == '.' || s[p - 1] == ',' || s[p - 1] == '-'))       \
            return -1;                                                                           \
        Py_ssize_t q = p + 1, c = 0;                                                             \
        while (q < hi && c < 18 && IS_DIGIT(s[q])) { q++; c++; } /* [0-9]{12,18}+ */             \
        if (c >= 12) return NAME##_card_tail(s, hi, q, '.') ? q : -1;                            \
        if (!NAME##_digits_at(s, hi, p + 1, 3) || p + 4 >= hi) return -1;                        \
        Py_UCS4 sep = s[p + 4];                                                                  \
        if (sep != ' ' && sep != '-') return -1;                                                 \
        if (NAME##_digits_at(s, hi, p + 5, 4) && p + 9 < hi && s[p + 9] == sep                   \
            && NAME##_digits_at(s, hi, p + 10, 4) && p + 14 < hi && s[p + 14] == sep) {          \
            /* 4-4-4 and a group of 1-4, maybe one of 1-3 after it */                           \
            Py_ssize_t g = NAME##_group(s, hi, p + 15);                                          \
            if (g < 1 || g > 4) return -1;                                                       \
            q = p + 15 + g;                                                                      \
            if (q < hi && s[q] == sep) {                                                         \
                Py_ssize_t g5 = NAME##_group(s, hi, q + 1);                                      \
                if (g5 == 0) return q;                                                           \
                return g5 <= 3 && NAME##_card_tail(s, hi, q + 1 + g5, sep) ? q + 1 + g5 : -1;    \
            }                                                                                    \
            return NAME##_card_tail(s, hi, q, sep) ? q : -1;                                     \
        }                                                                                        \
        if (NAME##_digits_at(s, hi, p + 5, 6) && p + 11 < hi && s[p + 11] == sep) {              \
            /* 4-6-4/5 */                                                                        \
            Py_ssize_t g = NAME##_group(s, hi, p + 12);                                          \
            if (g < 4 || g > 5) return -1;                                                       \
            return NAME##_card_tail(s, hi, p + 12 + g, sep) ? p + 12 + g : -1;                   \
        }                                                                                        \
        return -1;                                                                               \
    }                                                                                            \
    static int NAME##_luhn(const T *s, Py_ssize_t start, Py_ssize_t end) {                       \
        int sum = 0, odd = 0;                                                                    \
        for (Py_ssize_t j = end - 1; j >= start; j--) {                                          \
            if (!IS_DIGIT(s[j])) continue;                                                       \
            int d = (int)(s[j] - '0');                                                           \
            if (odd) { d *= 2; if (d > 9) d -= 9; }                                              \
            sum += d;                                                                            \
            odd = !odd;                                                                          \
        }                                                                                        \
        return sum % 10 == 0;                                                                    \
    }                                                                                            \
    static Py_ssize_t NAME##_ipv4_at(const T *s, Py_ssize_t p, Py_ssize_t hi) {                  \
        /* where recognizers._IPV4 matches at p ends, or -1: four groups of 1-3 digits, */      \
        /* each 0-255, whole (a shorter octet leaves a digit where "." or the end must be) */  \
        if (!IS_DIGIT(s[p]) || (p > 0 && IS_WORD(s[p - 1]))) return -1;                          \
        if (p >= 2 && s[p - 1] == '.' && IS_DIGIT(s[p - 2])) return -1;                          \
        Py_ssize_t q = p;                                                                        \
        for (int octet = 0; octet < 4; octet++) {                                                \
            if (octet > 0) {                                                                     \
                if (q >= hi || s[q] != '.') return -1;                                           \
                q++;                                                                             \
            }                                                                                    \
            Py_ssize_t g = NAME##_group(s, hi, q);                                               \
            if (g < 1 || g > 3) return -1;                                                       \
            int v = 0;                                                                           \
            for (Py_ssize_t x = q; x < q + g; x++) v = v * 10 + (int)(s[x] - '0');               \
            if (v > 255) return -1;                                                              \
            q += g;                                                                              \
        }                                                                                        \
        if (q < hi && IS_WORD(s[q])) return -1;                                                  \
        if (q + 1 < hi && s[q] == '.' && IS_DIGIT(s[q + 1])) return -1;                          \
        return q;                                                                                \
    }                                                                                            \
    static int NAME##_matches(const T *s, Py_ssize_t lo, Py_ssize_t hi, int cards, PyObject *out) { \
        /* finditer over [lo, hi) of _CARD (Luhn-valid only) or _IPV4 */                         \
        Py_ssize_t p = lo;                                                                       \
        while (p < hi) {                                                                         \
            Py_ssize_t e = cards ? NAME##_card_at(s, p, hi) : NAME##_ipv4_at(s, p, hi);          \
            if (e < 0) { p++; continue; }                                                        \
            if (!cards || NAME##_luhn(s, p, e)) {                                                \
                PyObject *span = Py_BuildValue("(nn)", p, e);                                    \
                if (span == NULL || PyList_Append(out, span) < 0) { Py_XDECREF(span); return -1; } \
                Py_DECREF(span);                                                                 \
            }                                                                                    \
            p = e;                                                                               \
        }                                                                                        \
        return 0;                                                                                \
    }                                                                                            \
    static PyObject *NAME##_run(const T *s, Py_ssize_t n, Py_ssize_t start, Py_ssize_t end, int shaped, \
                                PyObject *cards, PyObject *ipv4s) {                              \
        Py_ssize_t digits = 0, last = start, dots = 0;                                           \
        int zero = 0, ssn = 0, nanp = 0, trunk = 0;                                              \
        for (Py_ssize_t j = start; j < end; j++) {                                               \
            Py_UCS4 c = s[j];                                                                    \
            if (IS_DIGIT(c)) {                                                                   \
                digits++;                                                                        \
                last = j + 1;                                                                    \
                zero |= c == '0';                                                                \
            } else if (c == '.') {                                                               \
                dots++;                                                                          \
            }                                                                                    \
        }                                                                                        \
        int flags = 0;                                                                           \
        if (shaped) {                                                                            \
            flags |= R_SHAPED;                                                                   \
            for (Py_ssize_t j = start; j < end; j++) {                                           \
                if (!IS_DIGIT(s[j])) continue;                                                   \
                /* _SSN_SHAPE: (?<!d)(?:dddsddsdddd|d{9})(?!d), at the start of a group */      \
                if (!ssn && (j == start || !IS_DIGIT(s[j - 1]))) {                               \
                    Py_ssize_t g = NAME##_group(s, end, j);                                      \
                    if (g == 9) ssn = 1;                                                         \
                    else if (g == 3 && j + 3 < end && IS_S(s[j + 3])                             \
                             && NAME##_group(s, end, j + 4) == 2 && j + 6 < end && IS_S(s[j + 6]) \
                             && NAME##_group(s, end, j + 7) == 4)                                \
                        ssn = 1;                                                                 \
                }                                                                                \
                /* _NANP_SHAPE: ddd[sp]{1,2}ddd[sp]dddd, anywhere */                            \
                /* (bounded looks: "at least 3 digits" reads 3, not the whole group, so a  */ \
                /* run of n digits costs n steps, not n * n)                                 */ \
                if (!nanp && NAME##_digits_at(s, end, j, 3)) {                                   \
                    Py_ssize_t q = j + 3, k = 0;                                                 \
                    while (k < 2 && q < end && IS_SEP(s[q])) { q++; k++; }                       \
                    if (k > 0 && NAME##_digits_at(s, end, q, 3) && q + 3 < end && IS_SEP(s[q + 3]) \
                        && NAME##_digits_at(s, end, q + 4, 4))                                   \
                        nanp = 1;                                                                \
                }                                                                                \
                /* _TRUNK_SHAPES: dsd or dssd */                                                 \
                if (!trunk && j + 2 < end && IS_S(s[j + 1])                                      \
                    && (IS_DIGIT(s[j + 2]) || (j + 3 < end && IS_S(s[j + 2]) && IS_DIGIT(s[j + 3])))) \
                    trunk = 1;                                                                   \
            }                                                                                    \
            if (ssn) flags |= R_SSN;                                                             \
            if (nanp) flags |= R_NANP;                                                           \
            if (zero && trunk) flags |= R_TRUNK;                                                 \
        } else {                                                                                 \
            flags |= R_SSN | R_NANP | (zero ? R_TRUNK : 0);                                      \
        }                                                                                        \
        if (start > 0 && s[start - 1] == '+') flags |= R_PLUS;                                   \
        if (start >= 2 && IS_UPPER(s[start - 2]) && IS_UPPER(s[start - 1])) flags |= R_IBAN;     \
        if (dots >= 3) flags |= R_DOTS;                                                          \
        if (end - start >= 7) { /* as _Numbers: the patterns see 2 characters around the run */ \
            Py_ssize_t lo = start > 2 ? start - 2 : 0, hi = end + 2 < n ? end + 2 : n;           \
            if (digits >= 13 && NAME##_matches(s, lo, hi, 1, cards) < 0) return NULL;            \
            if (dots >= 3 && NAME##_matches(s, lo, hi, 0, ipv4s) < 0) return NULL;              \
        }                                                                                        \
        return Py_BuildValue("(nnnni)", start, end, digits, last, flags);                        \
    }                                                                                            \
    static Py_ssize_t NAME##_sk_at(const T *s, Py_ssize_t n, Py_ssize_t p) {                   \
        /* where recognizers._SK_KEY matches at p ("sk-" there) ends, or -1: not after a */     \
        /* word character or "-"; 20+ of [A-Za-z0-9_-] after "sk-" (all of them), holding */     \
        /* a digit and 16 letters or digits in a row */                                          \
        if (p > 0 && (IS_WORD(s[p - 1]) || s[p - 1] == '-')) return -1;                          \
        Py_ssize_t q = p + 3, row = 0;                                                           \
        int digit = 0, sixteen = 0;                                                              \
        while (q < n && (IS_ALNUM(s[q]) || s[q] == '_' || s[q] == '-')) {                        \
            if (IS_ALNUM(s[q])) { if (++row >= 16) sixteen = 1; } else row = 0;                  \
            digit |= IS_DIGIT(s[q]);                                                             \
            q++;                                                                                 \
        }                                                                                        \
        return q - (p + 3) >= 20 && digit && sixteen ? q : -1;                                   \
    }                                                                                            \
    static Py_ssize_t NAME##_local(const T *s, Py_ssize_t at) {                                \
        /* where [atom]+(?:\.[atom]+)* read backwards from "@" starts (at: none) */             \
        Py_ssize_t lo = at > LOCAL_MAX ? at - LOCAL_MAX : 0, k = at;                             \
        while (k > lo && IS_ATOM(s[k - 1])) k--;                                                 \
        if (k == at) return at;                                                                  \
        while (k - 1 > lo && s[k - 1] == '.' && IS_ATOM(s[k - 2])) {                             \
            k--;                                                                                 \
            while (k > lo && IS_ATOM(s[k - 1])) k--;                                             \
        }                                                                                        \
        return k;                                                                                \
    }                                                                                            \
    static Py_ssize_t NAME##_domain(const T *s, Py_ssize_t n, Py_ssize_t p) {                    \
        /* where _DOMAIN matched at p ends, or -1: labels "x." as many as there are, then */    \
        /* a TLD of 2-63 letters; failing that, the last label after the first that is one */   \
        Py_ssize_t labels = 0, best = -1;                                                        \
        for (;;) {                                                                               \
            Py_ssize_t q = p;                                                                    \
            while (q < n && IS_LDH(s[q])) q++;                                                   \
            Py_ssize_t r = q - p;                                                                \
            if (r < 1 || r > 63 || !IS_ALNUM(s[p]) || !IS_ALNUM(s[q - 1]) || q >= n || s[q] != '.') \
                break;                                                                           \
            if (labels >= 1 && r >= 2) {                                                         \
                Py_ssize_t j = p;                                                                \
                while (j < q && IS_LETTER(s[j])) j++;                                            \
                if (j == q) best = q;                                                            \
            }                                                                                    \
            labels++;                                                                            \
            p = q + 1;                                                                           \
        }                                                                                        \
        if (labels == 0) return -1;                                                              \
        Py_ssize_t m = 0;                                                                        \
        while (p + m < n && m < 64 && IS_LETTER(s[p + m])) m++;                                  \
        if (m >= 2 && m <= 63 && !(p + m < n && IS_LDH(s[p + m]))) return p + m;                 \
        return best;                                                                             \
    }                                                                                            \
    static int NAME(const T *s, Py_ssize_t n, int want_runs, int shaped, PyObject *runs, long *keys, \
                    PyObject *emails, PyObject *cards, PyObject *ipv4s, PyObject *sks) {         \
        long k = 0;                                                                              \
        Py_ssize_t sk_end = 0; /* a match's characters are not searched again (finditer) */     \
        for (Py_ssize_t i = 0; i < n; i++) {                                                     \
            while (i < n && (s[i] >= 256 || !look[s[i]])) i++; /* the common case, kept tight */ \
            if (i >= n) break;                                                                   \
            Py_UCS4 c = s[i];                                                                    \
            if (IS_DIGIT(c)) {                                                                   \
                if (!want_runs || (i > 0 && IS_DIGIT(s[i - 1]))) continue;                       \
                int ok = NAME##_digits_after(s, n, i + 1, 8)                                     \
                    || (i > 0 && s[i - 1] == '+' && NAME##_digits_after(s, n, i + 1, 7))         \
                    || (i >= 2 && IS_UPPER(s[i - 2]) && IS_UPPER(s[i - 1]) && i + 1 < n          \
                        && IS_DIGIT(s[i + 1]))                                                   \
                    || NAME##_ipv4_after(s, n, i + 1);                                           \
                if (!ok) continue;                                                               \
                Py_ssize_t e = i + 1;                                                            \
                while (e < n && IS_RUN(s[e])) e++;                                               \
                PyObject *span = NAME##_run(s, n, i, e, shaped, cards, ipv4s);                   \
                if (span == NULL || PyList_Append(runs, span) < 0) { Py_XDECREF(span); return -1; } \
                Py_DECREF(span);                                                                 \
                i = e - 1; /* s[e] is no digit: the loop goes on after it */                     \
                continue;                                                                        \
            }                                                                                    \
            switch (c) {                                                                         \
            case '-':                                                                            \
                if (i >= 2 && s[i - 2] == 's' && s[i - 1] == 'k') {                              \
                    k |= K_SK;                                                                   \
                    Py_ssize_t e;                                                                \
                    if (i - 2 >= sk_end && (e = NAME##_sk_at(s, n, i - 2)) >= 0) {               \
                        PyObject *span = Py_BuildValue("(nn)", i - 2, e);                        \
                        if (span == NULL || PyList_Append(sks, span) < 0) { Py_XDECREF(span); return -1; } \
                        Py_DECREF(span);                                                         \
                        sk_end = e;                                                              \
                    }                                                                            \
                }                                                                                \
                if (i >= 4 && s[i - 4] == 'x' && s[i - 3] == 'o' && s[i - 2] == 'x') {           \
                    Py_UCS4 v = s[i - 1];                                                        \
                    if (v == 'a' || v == 'b' || v == 'p' || v == 'r' || v == 's' || v == 'e')    \
                        k |= K_XOX;                                                              \
                }                                                                                \
                break;                                                                           \
            case 'A':                                                                            \
                if (i + 3 < n && ((s[i + 1] == 'K' && s[i + 2] == 'I' && s[i + 3] == 'A')        \
                                  || (s[i + 1] == 'S' && s[i + 2] == 'I' && s[i + 3] == 'A')     \
                                  || (s[i + 1] == 'I' && s[i + 2] == 'z' && s[i + 3] == 'a')))   \
                    k |= K_AWS;                                                                  \
                break;                                                                           \
            case '_':                                                                            \
                if (i >= 1 && s[i - 1] == 'k' && i + 5 < n && s[i + 5] == '_'                    \
                    && ((s[i + 1] == 'l' && s[i + 2] == 'i' && s[i + 3] == 'v' && s[i + 4] == 'e') \
                        || (s[i + 1] == 't' && s[i + 2] == 'e' && s[i + 3] == 's' && s[i + 4] == 't'))) \
                    k |= K_STRIPE;                                                               \
                if (i >= 3 && s[i - 3] == 'g' && s[i - 2] == 'h') {                              \
                    Py_UCS4 v = s[i - 1];                                                        \
                    if (v == 'p' || v == 'o' || v == 'u' || v == 's' || v == 'r') k |= K_GITHUB; \
                }                                                                                \
                if (i >= 6 && i + 4 < n && s[i - 6] == 'g' && s[i - 5] == 'i' && s[i - 4] == 't' \
                    && s[i - 3] == 'h' && s[i - 2] == 'u' && s[i - 1] == 'b' && s[i + 1] == 'p'  \
                    && s[i + 2] == 'a' && s[i + 3] == 't' && s[i + 4] == '_')                    \
                    k |= K_GITHUB;                                                               \
                break;                                                                           \
            case 'J':                                                                            \
                if (i >= 2 && s[i - 2] == 'e' && s[i - 1] == 'y') k |= K_JWT;                    \
                break;                                                                           \
            case '@': {                                                                          \
                Py_ssize_t start = NAME##_local(s, i), end;                                      \
                if (start < i && (end = NAME##_domain(s, n, i + 1)) >= 0) {                      \
                    PyObject *span = Py_BuildValue("(nn)", start, end);                          \
                    if (span == NULL || PyList_Append(emails, span) < 0) { Py_XDECREF(span); return -1; } \
                    Py_DECREF(span);                                                             \
                }                                                                                \
                break;                                                                           \
            }                                                                                    \
            case ':':                                                                            \
                if (i + 1 < n && (s[i + 1] == ':' || IS_DIGIT(s[i + 1])                          \
                                  || (s[i + 1] >= 'a' && s[i + 1] <= 'f')                        \
                                  || (s[i + 1] >= 'A' && s[i + 1] <= 'F')))                      \
                    k |= H_IPV6;                                                                 \
                break;                                                                           \
            case 'b':                                                                            \
            case 'B':                                                                            \
                if (i + 5 < n && ((s[i + 1] == 'e' && s[i + 2] == 'a' && s[i + 3] == 'r'         \
                                   && s[i + 4] == 'e' && s[i + 5] == 'r')                        \
                                  || (c == 'B' && s[i + 1] == 'E' && s[i + 2] == 'A'             \
                                      && s[i + 3] == 'R' && s[i + 4] == 'E' && s[i + 5] == 'R'))) \
                    k |= K_BEARER;                                                               \
                break;                                                                           \
            }                                                                                    \
        }                                                                                        \
        *keys = k;                                                                               \
        return 0;                                                                                \
    }

DEFINE_SCAN(scan1, Py_UCS1)
DEFINE_SCAN(scan2, Py_UCS2)
DEFINE_SCAN(scan4, Py_UCS4)

static PyObject *scan(PyObject *Py_UNUSED(module), PyObject *text) {
    if (!PyUnicode_Check(text)) {
        PyErr_SetString(PyExc_TypeError, "scan() needs a str");
        return NULL;
    }
    Py_ssize_t n = PyUnicode_GET_LENGTH(text);
    const void *data = PyUnicode_DATA(text);
    int kind = PyUnicode_KIND(text);
    int want_runs = 1, shaped = PyUnicode_IS_ASCII(text);
    if (!shaped) { /* as recognizers.py: runs only with 4+ digits */
        Py_ssize_t digits = 0;
        for (Py_ssize_t i = 0; i < n && digits < 4; i++) {
            Py_UCS4 c = PyUnicode_READ(kind, data, i);
            digits += IS_DIGIT(c);
        }
        want_runs = digits >= 4;
    }
    PyObject *runs = PyList_New(0), *emails = PyList_New(0), *cards = PyList_New(0), *ipv4s = PyList_New(0),
             *sks = PyList_New(0);
    if (runs == NULL || emails == NULL || cards == NULL || ipv4s == NULL || sks == NULL) {
        Py_XDECREF(runs);
        Py_XDECREF(emails);
        Py_XDECREF(cards);
        Py_XDECREF(ipv4s);
        Py_XDECREF(sks);
        return NULL;
    }
    long keys = 0;
    int rc;
    if (kind == PyUnicode_1BYTE_KIND) rc = scan1((const Py_UCS1 *)data, n, want_runs, shaped, runs, &keys, emails, cards, ipv4s, sks);
    else if (kind == PyUnicode_2BYTE_KIND) rc = scan2((const Py_UCS2 *)data, n, want_runs, shaped, runs, &keys, emails, cards, ipv4s, sks);
    else rc = scan4((const Py_UCS4 *)data, n, want_runs, shaped, runs, &keys, emails, cards, ipv4s, sks);
    if (rc < 0) {
        Py_DECREF(runs);
        Py_DECREF(emails);
        Py_DECREF(cards);
        Py_DECREF(ipv4s);
        Py_DECREF(sks);
        return NULL;
    }
    PyObject *result = Py_BuildValue("(NlNNNN)", runs, keys, emails, cards, ipv4s, sks);
    return result;
}

static PyMethodDef methods[] = {
    {"scan", scan, METH_O, "scan(text) -> (runs, keys, emails, cards, ipv4s, sks): where the PII recognizers must look."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "llmproxy.middlewares.pii._scan",
    "One pass over a text finding the runs of digits and the API-key prefixes the PII "
    "recognizers look at.", -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__scan(void) {
    init_classes();
    return PyModule_Create(&module);
}
