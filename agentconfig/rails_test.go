package agentconfig

import (
	"bytes"
	"encoding/json"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/encoding/prototext"
	"google.golang.org/protobuf/proto"

	"github.com/caddy-kas/caddy-kas/tunnel/grpctunnel/pb/agentcfg"
)

var update = flag.Bool("update", false, "rewrite the golden files of RailsBody")

// goldenAgentID is the agent id of the golden bodies.
const goldenAgentID = 5

// TestRailsBodyGolden checks the agent_configuration body made from each
// testdata/rails/*.yaml against the .json file next to it.
func TestRailsBodyGolden(t *testing.T) {
	files, err := filepath.Glob(filepath.Join("testdata", "rails", "*.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	if len(files) == 0 {
		t.Fatal("no golden inputs")
	}
	for _, in := range files {
		name := strings.TrimSuffix(filepath.Base(in), ".yaml")
		t.Run(name, func(t *testing.T) {
			data, err := os.ReadFile(in)
			if err != nil {
				t.Fatal(err)
			}
			f, err := Parse(data)
			if err != nil {
				t.Fatalf("Parse: %v", err)
			}
			body, err := RailsBody(goldenAgentID, f)
			if err != nil {
				t.Fatalf("RailsBody: %v", err)
			}
			golden := strings.TrimSuffix(in, ".yaml") + ".json"
			if *update {
				if err := os.WriteFile(golden, append(body, '\n'), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(golden)
			if err != nil {
				t.Fatal(err)
			}
			if got := string(body) + "\n"; got != string(want) {
				t.Errorf("RailsBody:\n got %s\nwant %s", got, want)
			}
			checkRailsBody(t, body, goldenAgentID, f)
		})
	}
}

// checkRailsBody checks the shape kas-spec §3.1 gives the body: an object
// with exactly agent_id, a string of decimal digits as GitLab's KAS sends
// it, and agent_config, the whole
// configuration file with its own field names.
func checkRailsBody(t *testing.T, body []byte, agentID int64, f *agentcfg.ConfigurationFile) {
	t.Helper()
	var top map[string]json.RawMessage
	if err := json.Unmarshal(body, &top); err != nil {
		t.Fatalf("body is not a JSON object: %v", err)
	}
	if len(top) != 2 || top["agent_id"] == nil || top["agent_config"] == nil {
		t.Fatalf("body has keys %v, want exactly agent_id and agent_config", keys(top))
	}
	var id string
	if err := json.Unmarshal(top["agent_id"], &id); err != nil || id != jsonInt(agentID) {
		t.Errorf("agent_id is %s, want the string %q", top["agent_id"], jsonInt(agentID))
	}
	// GitLab's own decoding of the configuration: the field names are the
	// proto names, so protojson reads it back to the same message.
	got := &agentcfg.ConfigurationFile{}
	if err := protojson.Unmarshal(top["agent_config"], got); err != nil {
		t.Fatalf("agent_config does not decode: %v", err)
	}
	if f == nil {
		f = &agentcfg.ConfigurationFile{}
	}
	if !proto.Equal(got, f) {
		t.Errorf("agent_config decodes to\n%v\nwant\n%v", prototext.Format(got), prototext.Format(f))
	}
	// No lowerCamelCase name anywhere: Rails reads snake_case keys.
	var cfg any
	if err := json.Unmarshal(top["agent_config"], &cfg); err != nil {
		t.Fatal(err)
	}
	checkSnakeCase(t, "agent_config", cfg)
	// The body goes through encoding/json unchanged, as GitLab's API
	// client sends its bodies.
	again, err := json.Marshal(json.RawMessage(body))
	if err != nil || !bytes.Equal(again, body) {
		t.Errorf("json.Marshal(json.RawMessage(body)) = %s, %v; want the body unchanged", again, err)
	}
}

func checkSnakeCase(t *testing.T, path string, v any) {
	t.Helper()
	switch v := v.(type) {
	case map[string]any:
		for k, e := range v {
			if strings.ToLower(k) != k {
				t.Errorf("%s: key %q is not snake_case", path, k)
			}
			checkSnakeCase(t, path+"."+k, e)
		}
	case []any:
		for _, e := range v {
			checkSnakeCase(t, path+"[]", e)
		}
	}
}

func keys(m map[string]json.RawMessage) []string {
	var ks []string
	for k := range m {
		ks = append(ks, k)
	}
	return ks
}

func jsonInt(n int64) string {
	b, _ := json.Marshal(n)
	return string(b)
}

func TestRailsBody(t *testing.T) {
	f := &agentcfg.ConfigurationFile{CiAccess: &agentcfg.CiAccessCF{Projects: []*agentcfg.CiAccessProjectCF{
		{Id: "group/app", AccessAs: ciJobAs()},
	}}}
	tests := []struct {
		name    string
		agentID int64
		f       *agentcfg.ConfigurationFile
		want    string
	}{
		{"nil file", 1, nil, `{"agent_id":"1","agent_config":{}}`},
		{"empty file", 1, &agentcfg.ConfigurationFile{}, `{"agent_id":"1","agent_config":{}}`},
		{"ci_access", 5, f, `{"agent_id":"5","agent_config":{"ci_access":{"projects":[{"id":"group/app","access_as":{"ci_job":{}}}]}}}`},
		{"large agent id keeps every digit", 9007199254740993, nil, `{"agent_id":"9007199254740993","agent_config":{}}`},
	}
	for _, c := range tests {
		t.Run(c.name, func(t *testing.T) {
			body, err := RailsBody(c.agentID, c.f)
			if err != nil {
				t.Fatal(err)
			}
			if string(body) != c.want {
				t.Errorf("RailsBody:\n got %s\nwant %s", body, c.want)
			}
			checkRailsBody(t, body, c.agentID, c.f)
		})
	}
}

func TestRailsBodyRefusesBadAgentID(t *testing.T) {
	for _, id := range []int64{0, -1} {
		if b, err := RailsBody(id, nil); err == nil {
			t.Errorf("RailsBody(%d) = %s, want an error", id, b)
		}
	}
}

func TestRailsBodyStable(t *testing.T) {
	// protojson varies its spacing from run to run on purpose; the body
	// must not.
	f, err := Parse([]byte("observability: {logging: {level: warn}}\nci_access: {groups: [{id: g}]}\n"))
	if err != nil {
		t.Fatal(err)
	}
	first, err := RailsBody(3, f)
	if err != nil {
		t.Fatal(err)
	}
	for range 20 {
		b, err := RailsBody(3, f)
		if err != nil || !bytes.Equal(b, first) {
			t.Fatalf("RailsBody changed: %s then %s (%v)", first, b, err)
		}
	}
}
