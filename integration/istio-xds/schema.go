package main

import (
	"context"
	"fmt"
	"os"
	"strings"

	"k8s.io/apiextensions-apiserver/pkg/apis/apiextensions"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	structuralschema "k8s.io/apiextensions-apiserver/pkg/apiserver/schema"
	"k8s.io/apiextensions-apiserver/pkg/apiserver/schema/cel"
	"k8s.io/apiextensions-apiserver/pkg/apiserver/schema/pruning"
	"k8s.io/apiextensions-apiserver/pkg/apiserver/validation"
	"k8s.io/apimachinery/pkg/util/json"
	"k8s.io/apimachinery/pkg/util/validation/field"
	celconfig "k8s.io/apiserver/pkg/apis/cel"
	"sigs.k8s.io/yaml"
)

// checkAgainstCRDs validates every custom resource in configText as a
// Kubernetes API server with the CRDs in crdFile installed would on create:
// the version must be served, the object must pass the version's OpenAPI
// schema (types, enums, patterns, required fields) and its CEL rules, and
// it may carry no field the schema does not know (which the server would
// silently prune). Objects of kinds crdFile does not define are skipped.
// It returns one line per problem.
func checkAgainstCRDs(crdFile, configText string) ([]string, error) {
	text, err := os.ReadFile(crdFile)
	if err != nil {
		return nil, err
	}
	crds := map[string]*apiextensionsv1.CustomResourceDefinition{}
	for _, doc := range documents(string(text)) {
		crd := &apiextensionsv1.CustomResourceDefinition{}
		if err := yaml.Unmarshal([]byte(doc), crd); err != nil {
			return nil, fmt.Errorf("%s: %v", crdFile, err)
		}
		if crd.Kind == "CustomResourceDefinition" {
			crds[crd.Spec.Group+"/"+crd.Spec.Names.Kind] = crd
		}
	}
	var problems []string
	for _, doc := range documents(configText) {
		// As the API server decodes a request body: integers stay int64.
		body, err := yaml.YAMLToJSON([]byte(doc))
		if err != nil {
			return nil, err
		}
		var object map[string]any
		if err := json.Unmarshal(body, &object); err != nil {
			return nil, err
		}
		apiVersion, _ := object["apiVersion"].(string)
		kind, _ := object["kind"].(string)
		group, version, _ := strings.Cut(apiVersion, "/")
		crd, ok := crds[group+"/"+kind]
		if !ok {
			continue
		}
		metadata, _ := object["metadata"].(map[string]any)
		name := fmt.Sprintf("%s %v/%v", kind, metadata["namespace"], metadata["name"])
		for _, problem := range checkObject(crd, version, object) {
			problems = append(problems, name+": "+problem)
		}
	}
	return problems, nil
}

func checkObject(crd *apiextensionsv1.CustomResourceDefinition, version string, object map[string]any) []string {
	var served *apiextensionsv1.CustomResourceDefinitionVersion
	for i := range crd.Spec.Versions {
		if v := &crd.Spec.Versions[i]; v.Name == version && v.Served {
			served = v
		}
	}
	if served == nil {
		return []string{fmt.Sprintf("version %s is not served", version)}
	}
	internal := &apiextensions.JSONSchemaProps{}
	if err := apiextensionsv1.Convert_v1_JSONSchemaProps_To_apiextensions_JSONSchemaProps(served.Schema.OpenAPIV3Schema, internal, nil); err != nil {
		return []string{err.Error()}
	}
	structural, err := structuralschema.NewStructural(internal)
	if err != nil {
		return []string{err.Error()}
	}
	var problems []string
	validator, _, err := validation.NewSchemaValidator(internal)
	if err != nil {
		return []string{err.Error()}
	}
	for _, e := range validation.ValidateCustomResource(field.NewPath(""), object, validator) {
		problems = append(problems, e.Error())
	}
	errs, _ := cel.NewValidator(structural, true, celconfig.PerCallLimit).
		Validate(context.Background(), field.NewPath(""), structural, object, nil, celconfig.RuntimeCELCostBudget)
	for _, e := range errs {
		problems = append(problems, e.Error())
	}
	pruned := deepCopy(object)
	unknown := pruning.PruneWithOptions(pruned, structural, true, structuralschema.UnknownFieldPathOptions{TrackUnknownFieldPaths: true})
	for _, path := range unknown {
		problems = append(problems, "unknown field "+path)
	}
	return problems
}

func documents(text string) []string {
	var docs []string
	for _, doc := range strings.Split(text, "\n---") {
		if strings.TrimSpace(strings.TrimPrefix(doc, "-")) != "" {
			docs = append(docs, doc)
		}
	}
	return docs
}

func deepCopy(object map[string]any) map[string]any {
	copied := map[string]any{}
	for key, value := range object {
		copied[key] = deepCopyValue(value)
	}
	return copied
}

func deepCopyValue(value any) any {
	switch v := value.(type) {
	case map[string]any:
		return deepCopy(v)
	case []any:
		out := make([]any, len(v))
		for i := range v {
			out[i] = deepCopyValue(v[i])
		}
		return out
	default:
		return v
	}
}
