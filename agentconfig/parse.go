package agentconfig

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/durationpb"
	"sigs.k8s.io/yaml"

	"github.com/caddy-kas/caddy-kas/tunnel/grpctunnel/pb/agentcfg"
)

// MaxFileSize is the largest configuration file accepted, in bytes: GitLab's
// agent server fetches at most 128 KiB (kas-spec §3.1). A file of exactly
// this size is accepted.
const MaxFileSize = 128 << 10

// ErrTooLarge is wrapped by the error [Parse] returns for a file larger
// than [MaxFileSize].
var ErrTooLarge = errors.New("configuration file too large")

// Error is a mistake in a configuration file. Path locates it with the
// file's own keys and list indexes, such as
// ci_access.projects[0].access_as; it is empty when the mistake is in the
// file as a whole.
type Error struct {
	Path string
	Msg  string
}

func (e *Error) Error() string {
	if e.Path == "" {
		return e.Msg
	}
	return e.Path + ": " + e.Msg
}

// Parse reads an agent configuration file as GitLab's agent server does
// (kas-spec §3.1): YAML (1.1, so yes and on are booleans) converted to
// JSON, then decoded into a ConfigurationFile with the field names of
// kas-spec §3.2, then validated (gitlab-wire §B.5).
//
// An empty file, or one holding only comments, is an empty configuration.
// A null value, as in a key with nothing after it, leaves its field unset.
// As in GitLab, where a key appears twice in a mapping the last one wins,
// and only the first YAML document of the file is read.
//
// Every error Parse returns is a mistake in the file, to be shown to its
// author: an [*Error] naming the field, or one wrapping [ErrTooLarge].
// Parse stops at the first mistake, reading mappings in sorted key order.
func Parse(data []byte) (*agentcfg.ConfigurationFile, error) {
	if len(data) > MaxFileSize {
		return nil, fmt.Errorf("configuration file is %d bytes, more than the limit of %d (128 KiB): %w",
			len(data), MaxFileSize, ErrTooLarge)
	}
	j, err := yaml.YAMLToJSON(data)
	if err != nil {
		return nil, &Error{Msg: "invalid YAML: " + err.Error()}
	}
	dec := json.NewDecoder(bytes.NewReader(j))
	dec.UseNumber()
	var v any
	if err := dec.Decode(&v); err != nil {
		// YAMLToJSON produced it, so this does not happen.
		return nil, &Error{Msg: "invalid YAML: " + err.Error()}
	}
	f := &agentcfg.ConfigurationFile{}
	if v == nil {
		return f, nil
	}
	if err := decodeMessage("", v, f.ProtoReflect()); err != nil {
		return nil, err
	}
	if err := validate(f); err != nil {
		return nil, err
	}
	return f, nil
}

// decodeMessage sets the fields of m from v, a JSON object. It accepts what
// protojson accepts when every field's JSON name is its proto name, as in
// GitLab's agentcfg.proto: unknown keys and values of the wrong type are
// errors, and null leaves a field unset.
func decodeMessage(path string, v any, m protoreflect.Message) error {
	obj, ok := v.(map[string]any)
	if !ok {
		return typeError(path, "an object", v)
	}
	fields := m.Descriptor().Fields()
	keys := make([]string, 0, len(obj))
	for k := range obj {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		fd := fields.ByName(protoreflect.Name(k))
		if fd == nil {
			msg := fmt.Sprintf("unknown field %q", k)
			// Our generated code knows the lowerCamelCase JSON names too,
			// but GitLab's does not: the file must use the snake_case ones.
			if alt := fields.ByJSONName(k); alt != nil {
				msg += fmt.Sprintf(" (did you mean %q?)", alt.Name())
			}
			return &Error{Path: path, Msg: msg}
		}
		val := obj[k]
		if val == nil {
			continue
		}
		if od := fd.ContainingOneof(); od != nil && !od.IsSynthetic() {
			if prev := m.WhichOneof(od); prev != nil {
				return &Error{Path: path, Msg: fmt.Sprintf("only one of %s may be set, not both %q and %q",
					oneofNames(od), prev.Name(), fd.Name())}
			}
		}
		if err := decodeField(join(path, k), val, m, fd); err != nil {
			return err
		}
	}
	return nil
}

func decodeField(path string, v any, m protoreflect.Message, fd protoreflect.FieldDescriptor) error {
	switch {
	case fd.IsMap():
		// The schema has no map field.
		return &Error{Path: path, Msg: "map fields are not supported"}
	case fd.IsList():
		arr, ok := v.([]any)
		if !ok {
			return typeError(path, "a list", v)
		}
		list := m.Mutable(fd).List()
		for i, e := range arr {
			ep := index(path, i)
			if isPlainMessage(fd) {
				elem := list.NewElement()
				if err := decodeMessage(ep, e, elem.Message()); err != nil {
					return err
				}
				list.Append(elem)
				continue
			}
			pv, err := decodeScalar(ep, e, fd)
			if err != nil {
				return err
			}
			list.Append(pv)
		}
		return nil
	case isPlainMessage(fd):
		return decodeMessage(path, v, m.Mutable(fd).Message())
	default:
		pv, err := decodeScalar(path, v, fd)
		if err != nil {
			return err
		}
		m.Set(fd, pv)
		return nil
	}
}

var durationName = (&durationpb.Duration{}).ProtoReflect().Descriptor().FullName()

// isPlainMessage says whether fd holds a message written as a JSON object,
// unlike google.protobuf.Duration, which is written as a string.
func isPlainMessage(fd protoreflect.FieldDescriptor) bool {
	return fd.Message() != nil && fd.Message().FullName() != durationName
}

// decodeScalar decodes a value that is not a JSON object: a string, a
// boolean, an enum or a duration.
func decodeScalar(path string, v any, fd protoreflect.FieldDescriptor) (protoreflect.Value, error) {
	if fd.Message() != nil { // a duration
		s, ok := v.(string)
		if !ok {
			return protoreflect.Value{}, typeError(path, `a duration such as "300s"`, v)
		}
		d, err := parseDuration(s)
		if err != nil {
			return protoreflect.Value{}, &Error{Path: path, Msg: err.Error()}
		}
		return protoreflect.ValueOfMessage(d.ProtoReflect()), nil
	}
	switch fd.Kind() {
	case protoreflect.StringKind:
		s, ok := v.(string)
		if !ok {
			return protoreflect.Value{}, typeError(path, "a string", v)
		}
		return protoreflect.ValueOfString(s), nil
	case protoreflect.BoolKind:
		b, ok := v.(bool)
		if !ok {
			return protoreflect.Value{}, typeError(path, "a boolean", v)
		}
		return protoreflect.ValueOfBool(b), nil
	case protoreflect.EnumKind:
		return decodeEnum(path, v, fd.Enum())
	default:
		// The schema has no field of another kind.
		return protoreflect.Value{}, &Error{Path: path, Msg: fmt.Sprintf("fields of kind %s are not supported", fd.Kind())}
	}
}

// decodeEnum accepts a value's name, as GitLab's documentation writes it,
// or, as protojson does, its number; only values the enum defines.
func decodeEnum(path string, v any, ed protoreflect.EnumDescriptor) (protoreflect.Value, error) {
	values := ed.Values()
	var evd protoreflect.EnumValueDescriptor
	switch v := v.(type) {
	case string:
		evd = values.ByName(protoreflect.Name(v))
	case json.Number:
		if n, err := strconv.ParseInt(string(v), 10, 32); err == nil {
			evd = values.ByNumber(protoreflect.EnumNumber(n))
		}
	default:
		return protoreflect.Value{}, typeError(path, "one of "+enumNames(ed), v)
	}
	if evd == nil {
		return protoreflect.Value{}, &Error{Path: path, Msg: fmt.Sprintf("invalid value %s: want one of %s", describe(v), enumNames(ed))}
	}
	return protoreflect.ValueOfEnum(evd.Number()), nil
}

// parseDuration reads a duration as protojson does: seconds, with up to
// nine decimals, followed by "s".
func parseDuration(s string) (*durationpb.Duration, error) {
	b, err := json.Marshal(s)
	if err == nil {
		d := &durationpb.Duration{}
		if err = protojson.Unmarshal(b, d); err == nil {
			return d, nil
		}
	}
	return nil, fmt.Errorf(`invalid duration %s: want a number of seconds followed by "s", such as "300s" or "1.5s"`, describe(s))
}

func typeError(path, want string, v any) error {
	msg := fmt.Sprintf("want %s, got %s", want, describe(v))
	if want == "a string" {
		switch v.(type) {
		case json.Number:
			msg += "; quote the value to make it a string"
		case bool:
			msg += "; quote the value to make it a string (YAML reads yes, no, on, off, true and false as booleans)"
		}
	}
	return &Error{Path: path, Msg: msg}
}

// describe names a decoded JSON value for an error message.
func describe(v any) string {
	switch v := v.(type) {
	case nil:
		return "null"
	case bool:
		return "boolean " + strconv.FormatBool(v)
	case json.Number:
		return "number " + truncate(string(v))
	case string:
		return strconv.Quote(truncate(v))
	case []any:
		return "a list"
	case map[string]any:
		return "an object"
	default:
		return fmt.Sprintf("%T", v)
	}
}

// truncate shortens a value quoted in an error message.
func truncate(s string) string {
	const n = 64
	if len(s) <= n {
		return s
	}
	cut := n
	for cut > 0 && !isRuneStart(s[cut]) {
		cut--
	}
	return s[:cut] + "..."
}

func isRuneStart(b byte) bool { return b&0xC0 != 0x80 }

func enumNames(ed protoreflect.EnumDescriptor) string {
	values := ed.Values()
	names := make([]string, values.Len())
	for i := range names {
		names[i] = string(values.Get(i).Name())
	}
	return strings.Join(names, ", ")
}

func oneofNames(od protoreflect.OneofDescriptor) string {
	fields := od.Fields()
	names := make([]string, fields.Len())
	for i := range names {
		names[i] = string(fields.Get(i).Name())
	}
	return orList(names)
}

// orList writes names as "a, b or c".
func orList(names []string) string {
	if len(names) < 2 {
		return strings.Join(names, "")
	}
	return strings.Join(names[:len(names)-1], ", ") + " or " + names[len(names)-1]
}

func join(path, name string) string {
	if path == "" {
		return name
	}
	return path + "." + name
}
